-- Make every job held for one API key (by a pause, or parked for a moment of its budget)
-- due now: the pause ended, or an operator resumed the key. Their reserved moments are
-- forgotten; they reserve again when they wake. A job whose message is already on its way
-- is left to it (claim_due.lua), so a release adds no second message.
--
-- KEYS[1]  the set of job ids held for the key
-- KEYS[2]  the schedule
-- ARGV[1]  spread in seconds: job i becomes due at now + spread * i / count
-- ARGV[2]  prefix of job hash keys (the job id is appended)
-- Returns how many jobs were released.
local ids = redis.call('SMEMBERS', KEYS[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local spread = tonumber(ARGV[1])
local released = 0
for i, id in ipairs(ids) do
  if redis.call('ZADD', KEYS[2], 'XX', 'CH', now + spread * (i - 1) / #ids, id) == 1 then
    released = released + 1
  end
  local key = ARGV[2] .. id
  if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, '_slot', 'null') end
end
redis.call('DEL', KEYS[1])
return released
