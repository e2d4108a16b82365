-- Make completion webhooks due again at once because their messages were never sent (the
-- broker refused them): they leave their receivers' in-flight sets and count as not sent,
-- so the next claim hands them out without waiting for a lease.
--
-- KEYS[1]  the schedule of completion webhooks
-- KEYS[2]  every delivery in flight
-- ARGV[1]  prefix of job hash keys (the job id is appended)
-- ARGV[2]  prefix of receiver in-flight sorted sets (the receiver is appended)
-- ARGV[3..] job id, token, receiver, job id, token, receiver, ...
-- Returns how many were made due.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local count = 0
for i = 3, #ARGV, 3 do
  local id, token, receiver = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local key = ARGV[1] .. id
  if (tonumber(redis.call('HGET', key, '_notify_token')) or 0) == token then
    redis.call('ZREM', ARGV[2] .. receiver, id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('HSET', key, '_notify_sent_at', 'null')
    if redis.call('ZSCORE', KEYS[1], id) then
      redis.call('ZADD', KEYS[1], now, id)
      count = count + 1
    end
  end
end
return count
