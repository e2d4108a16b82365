-- Count one createTask answer of a key and report the recent answers by kind, so that a
-- run of 455s (or 429s) can be told from a stray one: how many of each kind came within
-- the window, and how many 455s and 429s came last in a row (across all workers).
--
-- KEYS[1]  recent answers of the kind being counted (sorted set of unique members)
-- KEYS[2]  recent 455 answers
-- KEYS[3]  recent 429 answers
-- KEYS[4]  recent other answers
-- KEYS[5]  455s in a row (counter)
-- KEYS[6]  429s in a row (counter)
-- ARGV[1]  window in seconds
-- ARGV[2]  a unique member for this answer
-- ARGV[3]  the kind: '455', '429' or 'other'
-- Returns {455s, 429s, others within the window, 455s in a row, 429s in a row}.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local window = tonumber(ARGV[1])
local ttl = math.ceil(window) + 1
redis.call('ZADD', KEYS[1], now, ARGV[2])
local counts = {}
for i = 2, 4 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  redis.call('EXPIRE', KEYS[i], ttl)
  table.insert(counts, redis.call('ZCARD', KEYS[i]))
end
for i, kind in ipairs({'455', '429'}) do
  local key = KEYS[4 + i]
  if ARGV[3] == kind then
    table.insert(counts, redis.call('INCR', key))
    redis.call('EXPIRE', key, ttl)
  else
    redis.call('DEL', key)
    table.insert(counts, 0)
  end
end
return counts
