-- End a pause, but only the very pause the caller looked at: a probe that succeeded must
-- not erase an operator's pause (or a newer automatic one) set while it was probing.
--
-- KEYS[1]  the key's pause (hash)
-- ARGV[1]  its reason as the caller read it
-- ARGV[2]  its start ('since') as the caller read it
-- Returns 1 when the pause was ended, else 0.
if redis.call('HGET', KEYS[1], 'reason') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'since') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
return 1
