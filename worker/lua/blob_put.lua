-- Store the source images of one job, all of them or none, unless the blobs kept would
-- then hold more than the cap: blobs share the job store's Redis, which may run with
-- noeviction, so a producer is refused rather than let images fill it. Each blob is
-- tracked (its size, when it expires) so that the total is known without a scan; the
-- entries of blobs whose time to live has passed are pruned first.
--
-- KEYS[1]  sorted set of stored blob ids, scored by when they expire (Redis clock)
-- KEYS[2]  hash: blob id -> its size in bytes
-- KEYS[3]  the total bytes of the blobs tracked (string)
-- KEYS[4..] the blobs' keys, one per blob in ARGV order
-- ARGV[1]  the cap on total bytes
-- ARGV[2]  time to live of each blob, in seconds
-- ARGV[3..] blob id, bytes, blob id, bytes, ...
-- Returns {1, total after} stored, or {0, total now} refused (nothing written).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
local total = tonumber(redis.call('GET', KEYS[3]) or '0')
for _, id in ipairs(expired) do
  total = total - tonumber(redis.call('HGET', KEYS[2], id) or '0')
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
end
if total < 0 then total = 0 end
local cap, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local adding = 0
for i = 3, #ARGV, 2 do adding = adding + string.len(ARGV[i + 1]) end
if total + adding > cap then
  redis.call('SET', KEYS[3], total)
  return {0, total}
end
local n = 4
for i = 3, #ARGV, 2 do
  local id, data = ARGV[i], ARGV[i + 1]
  redis.call('SET', KEYS[n], data, 'EX', ttl)
  redis.call('ZADD', KEYS[1], now + ttl, id)
  redis.call('HSET', KEYS[2], id, string.len(data))
  n = n + 1
end
total = total + adding
redis.call('SET', KEYS[3], total)
return {1, total}
