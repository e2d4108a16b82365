-- Pause submissions of a key for a whole-key condition (455, 402), unless it is already
-- paused (an operator's pause is never replaced by an automatic one).
--
-- KEYS[1]  the key's pause (hash)
-- ARGV[1]  reason ('455', '402')
-- ARGV[2]  message
-- ARGV[3]  seconds until the first probe
-- Returns 1 when this call paused the key, else 0.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'reason', ARGV[1], 'message', ARGV[2], 'since', tostring(now),
  'interval', ARGV[3], 'probe_at', tostring(now + tonumber(ARGV[3])))
return 1
