-- Delete blobs and give their bytes back to the total that blob_put.lua caps.
--
-- KEYS[1]  sorted set of stored blob ids, scored by when they expire
-- KEYS[2]  hash: blob id -> its size in bytes
-- KEYS[3]  the total bytes of the blobs tracked (string)
-- KEYS[4..] the blobs' keys, one per blob id in ARGV order
-- ARGV[1..] blob ids
-- Returns how many tracked blobs were given back.
local total = tonumber(redis.call('GET', KEYS[3]) or '0')
local freed = 0
for i, id in ipairs(ARGV) do
  redis.call('DEL', KEYS[i + 3])
  local size = redis.call('HGET', KEYS[2], id)
  if size then
    total = total - tonumber(size)
    freed = freed + 1
    redis.call('HDEL', KEYS[2], id)
    redis.call('ZREM', KEYS[1], id)
  end
end
if total < 0 then total = 0 end
redis.call('SET', KEYS[3], total)
return freed
