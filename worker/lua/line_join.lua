-- Put a queued job (no upstream task) back in its line, at its place, to wait for a send
-- moment of its provider's key: the step holding the job's latest dispatch token parks
-- it there. Its place in the schedule becomes only a backstop (its submit deadline).
--
-- KEYS[1]  the job's hash
-- KEYS[2]  the schedule
-- ARGV[1]  job id
-- ARGV[2]  the dispatch token the caller holds
-- ARGV[3]  seconds until the schedule hands the job out anyway (its submit deadline)
-- ARGV[4]  time to live of the record, in seconds
-- ARGV[5]  prefix of the waiting lines' keys
-- ARGV[6..] field, JSON value, ... written with it
-- Returns 1 in line, 0 refused (not queued, or it has a task), -1 no such job, -2 stale.
-- #include lines.lua
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
local task = redis.call('HGET', KEYS[1], 'upstream_task_id')
if state ~= '"queued"' or (task and task ~= 'null') then return 0 end
if tonumber(redis.call('HGET', KEYS[1], '_dispatch') or '0') ~= tonumber(ARGV[2]) then
  return -2
end
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[1], '_parked', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
line_join(ARGV[5], KEYS[1], ARGV[1])
return 1
