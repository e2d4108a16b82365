-- Close a createTask attempt that created no task we know of: refused, failed, or of
-- unknown outcome (the answer was lost). Only the attempt's owner may close it.
--
-- KEYS[1]  the job's hash
-- ARGV[1]  attempt id
-- ARGV[2]  '1' when the outcome is unknown (the upstream may have created a task)
-- ARGV[3]  time to live of the record, in seconds
-- ARGV[4..] field, JSON value, ... to write with it (the last error)
-- Returns 1 when the attempt was open and ours, else 0.
if redis.call('HGET', KEYS[1], '_attempt') ~= cjson.encode(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], '_attempt', 'null', 'attempt_started_at', 'null')
if ARGV[2] == '1' then
  local t = redis.call('TIME')
  redis.call('HINCRBY', KEYS[1], 'unknown_outcomes', 1)
  redis.call('HSET', KEYS[1], '_unknown_at', string.format('%.6f', t[1] + t[2] / 1e6))
end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
