-- How much of a key's budget is in use.
--
-- KEYS[1]  the key's log of reserved moments
-- KEYS[2]  the moment until which the key is blocked, if any
-- ARGV[1]  window in seconds
-- Returns {sent in the last window, reserved ahead, blocked until, now} as strings.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local used = redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[1]), now)
local ahead = redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
return {tostring(used), tostring(ahead), redis.call('GET', KEYS[2]) or '0', tostring(now)}
