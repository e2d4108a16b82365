-- Record the outcome of one delivery of a completion webhook. This runs after the job
-- finished, when update.lua refuses every write, so it has its own script; it writes
-- only `notification` and the internal webhook fields, never the job's state or results,
-- and it keeps the record's time to live.
--
-- KEYS[1]  the job's hash
-- KEYS[2]  the schedule of completion webhooks
-- KEYS[3]  the receiver's state hash
-- KEYS[4]  the receiver's in-flight sorted set
-- KEYS[5]  every delivery in flight
-- ARGV[1]  job id
-- ARGV[2]  webhook token the delivery held
-- ARGV[3]  outcome: 'delivered', 'retry', 'failed', or 'dropped' (nothing to deliver)
-- ARGV[4]  JSON of the new `notification` ('' for 'dropped')
-- ARGV[5]  seconds until the next try ('retry' only)
-- ARGV[6]  time to live of the receiver's state, in seconds
-- Returns 'ok', 'stale' (a newer message owns the webhook) or 'missing' (no such job).
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
  return 'missing'
end
if (tonumber(redis.call('HGET', KEYS[1], '_notify_token')) or 0) ~= tonumber(ARGV[2]) then
  return 'stale'
end
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('HSET', KEYS[1], '_notify_sent_at', 'null')
local outcome = ARGV[3]
if outcome == 'dropped' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 'ok'
end
redis.call('HSET', KEYS[1], 'notification', ARGV[4])
if outcome == 'retry' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
if outcome == 'delivered' then
  redis.call('HINCRBY', KEYS[3], 'streak', 1)
else
  redis.call('HSET', KEYS[3], 'streak', 0)
end
redis.call('EXPIRE', KEYS[3], ARGV[6])
return 'ok'
