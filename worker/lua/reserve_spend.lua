-- Reserve the earliest moment at which one more createTask keeps every window of the
-- key's spend cap within its limit (one sliding log of spend reservations, checked
-- against each of the cap's windows), unless that moment is further ahead than the
-- caller may wait. A reservation that is replaced (its moment passed unused) is
-- removed first, in the same step, so that a job never holds two.
--
-- KEYS[1]  the key's log of spend reservations (sorted set: member -> moment)
-- ARGV[1]  how far ahead a moment may be reserved, in seconds
-- ARGV[2]  a unique member for the new reservation
-- ARGV[3]  the member of a reservation this one replaces ('' for none)
-- ARGV[4]  the number of windows N
-- ARGV[5], ARGV[6] ... ARGV[3 + 2N], ARGV[4 + 2N]  accepted createTasks allowed, window
--          in seconds, for each window
-- Returns {'1' reserved or '0', delay in seconds, the moment} as strings (a Lua number
-- would be truncated to an integer on the way back).
-- #include sliding_log.lua
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local ahead, count = tonumber(ARGV[1]), tonumber(ARGV[4])
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[1], ARGV[3]) end
local windows, longest = {}, 0
for i = 0, count - 1 do
  local limit, window = tonumber(ARGV[5 + 2 * i]), tonumber(ARGV[6 + 2 * i])
  table.insert(windows, {limit, window})
  if window > longest then longest = window end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - longest)
return reserve_moment(KEYS[1], ARGV[2], now, earliest_moment(KEYS[1], now, windows), ahead,
  longest)
