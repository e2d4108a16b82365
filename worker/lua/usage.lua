-- How much of a key's budget is in use.
--
-- KEYS[1]  the key's log of sends
-- KEYS[2]  the moments granted and not yet used (member -> when the grant expires)
-- KEYS[3]  the moment until which the key is blocked, if any
-- ARGV[1]  window in seconds
-- Returns {sent in the last window, granted and not yet used, blocked until, now} as
-- strings.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local used = redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[1]), now)
local granted = redis.call('ZCOUNT', KEYS[2], now, '+inf')
return {tostring(used), tostring(granted), redis.call('GET', KEYS[3]) or '0', tostring(now)}
