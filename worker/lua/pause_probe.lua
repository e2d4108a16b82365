-- Claim the next probe of an automatic pause, for exactly one caller once it is due; the
-- probe after it comes twice as late (up to a maximum).
--
-- KEYS[1]  the key's pause (hash)
-- ARGV[1]  longest interval between probes, in seconds
-- Returns 1 when the caller should probe now, else 0.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local reason = redis.call('HGET', KEYS[1], 'reason')
if not reason or reason == 'operator' then return 0 end
local probe_at = tonumber(redis.call('HGET', KEYS[1], 'probe_at'))
if now < probe_at then return 0 end
local interval = math.min(tonumber(redis.call('HGET', KEYS[1], 'interval')) * 2,
  tonumber(ARGV[1]))
redis.call('HSET', KEYS[1], 'interval', tostring(interval), 'probe_at', tostring(now + interval))
return 1
