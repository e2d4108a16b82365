-- Give back a key claimed with claim.lua: delete it, only while it holds the token.
--
-- KEYS[1]  the key
-- ARGV[1]  the holder's token
-- Returns 1 when it was deleted, 0 when it held another token (or nothing).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
