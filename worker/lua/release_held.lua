-- Release every job held for one API key (by its pause): the pause ended, or an operator
-- resumed the key. A queued job without a task goes back to its line, at its place
-- (lines.lua), so that the held jobs are sent in the lines' order; any other job becomes
-- due now, spread over a moment. A job whose message is already on its way is left to it
-- (claim_due.lua; its step puts it in line), so a release adds no second message.
--
-- KEYS[1]  the set of job ids held for the key
-- KEYS[2]  the schedule
-- ARGV[1]  spread in seconds: job i becomes due at now + spread * i / count
-- ARGV[2]  prefix of job hash keys (the job id is appended)
-- ARGV[3]  prefix of the waiting lines' keys
-- ARGV[4]  seconds from a job's creation to its submit deadline, and a margin
-- Returns how many jobs were released.
-- #include lines.lua
local ids = redis.call('SMEMBERS', KEYS[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local spread = tonumber(ARGV[1])
local released = 0
for i, id in ipairs(ids) do
  local key = ARGV[2] .. id
  local fields = redis.call('HMGET', key, 'state', 'upstream_task_id', 'created_at',
    '_dispatch', '_parked')
  local unsent = fields[1] == '"queued"' and ((not fields[2]) or fields[2] == 'null')
  if unsent and fields[4] ~= fields[5] then
    -- Its latest message is on its way or its step runs: that step puts it in line.
  elseif unsent then
    redis.call('HSET', key, '_grant', 'null')
    line_join(ARGV[3], key, id)
    local deadline = (tonumber(fields[3]) or now) + tonumber(ARGV[4])
    redis.call('ZADD', KEYS[2], 'XX', math.max(deadline, now), id)
    released = released + 1
  elseif redis.call('ZADD', KEYS[2], 'XX', 'CH', now + spread * (i - 1) / #ids, id) == 1 then
    released = released + 1
  end
end
redis.call('DEL', KEYS[1])
return released
