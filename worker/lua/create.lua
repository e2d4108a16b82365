-- Create a queued job with its request, unless its idempotency key already names a job.
-- The job waits in its line (lines.lua) for a send moment of its provider's key; its
-- place in the schedule is only a backstop, at its submit deadline. Record values are
-- JSON text.
--
-- KEYS[1]  the job's hash
-- KEYS[2]  the schedule (sorted set: job id -> when its next step is due)
-- KEYS[3]  the index of queued jobs (sorted set: job id -> creation time)
-- KEYS[4]  the idempotency key (optional)
-- ARGV[1]  job id
-- ARGV[2]  time to live of the record and the idempotency key, in seconds
-- ARGV[3]  seconds until the schedule hands the job out (its submit deadline and a margin)
-- ARGV[4]  prefix of the waiting lines' keys
-- ARGV[5..] field, value, field, value, ... of the new record
-- Returns {job id that owns the idempotency key or the job id, 1 if a record was written}.
-- #include lines.lua
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if KEYS[4] then
  local owner = redis.call('GET', KEYS[4])
  if owner then return {owner, 0} end
  redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[2])
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {ARGV[1], 0} end
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'created_at', string.format('%.6f', now), '_dispatch', '0',
  '_parked', '0', '_dispatched_at', string.format('%.6f', now))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('ZADD', KEYS[3], now, ARGV[1])
line_join(ARGV[4], KEYS[1], ARGV[1])
return {ARGV[1], 1}
