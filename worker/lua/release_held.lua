-- Make every job held by a pause of one API key due now (the pause has ended).
--
-- KEYS[1]  the set of job ids held by the key's pause
-- KEYS[2]  the schedule
-- ARGV[1]  spread in seconds: job i becomes due at now + spread * i / count
-- Returns how many jobs were released.
local ids = redis.call('SMEMBERS', KEYS[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local spread = tonumber(ARGV[1])
for i, id in ipairs(ids) do
  redis.call('ZADD', KEYS[2], 'XX', now + spread * (i - 1) / #ids, id)
end
redis.call('DEL', KEYS[1])
return #ids
