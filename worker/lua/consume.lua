-- Use a granted send moment (grant.lua): the request is sent now, so the moment is logged
-- now, which is what every window of the budget counts. A grant that expired or was given
-- back, or a key blocked after an upstream 429 since it was granted, is refused (and the
-- grant given back).
--
-- KEYS[1]  the key's log of sends (sorted set: member -> when it was sent)
-- KEYS[2]  the moments granted and not yet used (sorted set: member -> when it expires)
-- KEYS[3]  the moment until which the key is blocked (string), if any
-- ARGV[1]  the grant's member
-- ARGV[2]  the window in seconds (how long the log must keep a send)
-- Returns 1 (send now) or 0 (refused).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local expires = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]) or '0')
redis.call('ZREM', KEYS[2], ARGV[1])
if expires < now then return 0 end
if tonumber(redis.call('GET', KEYS[3]) or '0') > now then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) + 1))
return 1
