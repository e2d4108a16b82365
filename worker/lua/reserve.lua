-- Reserve the earliest moment at which one more createTask keeps every window of the
-- key's budget within its limit (a sliding log of reservations), unless that moment is
-- further ahead than the caller may wait, or the key is blocked after an upstream 429.
--
-- KEYS[1]  the key's log of reserved moments (sorted set)
-- KEYS[2]  the moment until which the key is blocked (string), if any
-- ARGV[1]  requests allowed per window
-- ARGV[2]  window in seconds
-- ARGV[3]  how far ahead a moment may be reserved, in seconds
-- ARGV[4]  a unique member for the reservation
-- Returns {'1' reserved or '0', delay in seconds, the moment} as strings (a Lua number
-- would be truncated to an integer on the way back).
-- #include sliding_log.lua
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local limit, window, ahead = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local at = now
local blocked = tonumber(redis.call('GET', KEYS[2]) or '0')
if blocked > at then at = blocked end
at = earliest_moment(KEYS[1], at, {{limit, window}})
return reserve_moment(KEYS[1], ARGV[4], now, at, ahead, window)
