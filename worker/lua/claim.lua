-- Claim a key for one holder: set it to the holder's token, unless another holder's token
-- is there. The same call run again (a retry after its answer was lost) finds its own
-- token and is told yes.
--
-- KEYS[1]  the key
-- ARGV[1]  the holder's token (unique to one claim)
-- ARGV[2]  time to live, in seconds
-- Returns 1 when the key is now this token's, 0 when another holder has it.
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
