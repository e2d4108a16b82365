-- Make jobs of the schedule due at once because no message of theirs is on its way (the
-- broker refused it); marks them parked, so that a backlog does not hold them back.
--
-- KEYS[1]  the schedule
-- ARGV[1]  prefix of job hash keys (the job id is appended)
-- ARGV[2..] job ids
-- Returns how many were in the schedule.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local count = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], id) then
    local key = ARGV[1] .. id
    redis.call('ZADD', KEYS[1], now, id)
    redis.call('HSET', key, '_parked', redis.call('HGET', key, '_dispatch') or '0')
    count = count + 1
  end
end
return count
