-- Hold every send of a key for a while (after an upstream 429); pushes the moment out,
-- never in. The moments granted and not yet used are void: they were granted for a
-- budget the upstream just said is spent.
--
-- KEYS[1]  the moment until which the key is blocked (string)
-- KEYS[2]  the moments granted and not yet used (sorted set)
-- ARGV[1]  seconds from now
-- Returns the moment until which the key is now blocked, as a string.
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ > current then
  redis.call('SET', KEYS[1], tostring(until_), 'EX', math.ceil(tonumber(ARGV[1])) + 1)
end
redis.call('DEL', KEYS[2])
return tostring(math.max(until_, current))
