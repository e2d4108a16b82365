-- Give back send moments granted and not used (grant.lua): no job took them. Each one
-- given back also takes back its step of the pace, so that moments nobody used do not
-- hold back the next paced ones.
--
-- KEYS[1]  the moments granted and not yet used (sorted set)
-- KEYS[2]  when the next paced moment comes (string)
-- ARGV[1]  seconds between two paced moments
-- ARGV[2..] the members given back
-- Returns how many were still granted.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local period = tonumber(ARGV[1])
local given = 0
for i = 2, #ARGV do given = given + redis.call('ZREM', KEYS[1], ARGV[i]) end
local pace = tonumber(redis.call('GET', KEYS[2]) or '0')
if given > 0 and pace > now - period then
  redis.call('SET', KEYS[2], string.format('%.6f', math.max(pace - given * period, now - period)),
    'KEEPTTL')
end
return given
