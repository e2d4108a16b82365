-- Add to a counter of an unfinished job (polls, retries ...) and renew the record's life.
--
-- KEYS[1]  the job's hash
-- ARGV[1]  field
-- ARGV[2]  amount
-- ARGV[3]  time to live of the record, in seconds
-- Returns the new value, or nil when the job is missing or finished.
local finished = {['"succeeded"'] = true, ['"failed"'] = true, ['"cancelled"'] = true}
local state = redis.call('HGET', KEYS[1], 'state')
if (not state) or finished[state] then return nil end
local value = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return value
