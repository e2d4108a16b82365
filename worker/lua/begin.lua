-- Start a step of a job. Only the message carrying the job's latest dispatch token may;
-- its lease is renewed (the job is due again after it unless the step reschedules it),
-- and the record notes that this token's step has begun (see claim_due.lua).
--
-- KEYS[1]  the job's hash
-- KEYS[2]  the schedule
-- ARGV[1]  job id
-- ARGV[2]  the message's dispatch token
-- ARGV[3]  lease in seconds
-- ARGV[4]  time to live of the record, in seconds
-- ARGV[5]  'poll' for a poll step: a job with an upstream task to ask about (one the relay
--          did not answer at once with its images) counts one more poll ('polls')
-- Returns {'ok', field, value, ...} with every field of the record, or {'missing'},
-- {'finished'} (both leave the schedule) or {'stale'} (a newer message owns the job).
local finished = {['"succeeded"'] = true, ['"failed"'] = true, ['"cancelled"'] = true}
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {'missing'}
end
if finished[state] then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {'finished'}
end
if tonumber(redis.call('HGET', KEYS[1], '_dispatch') or '0') ~= tonumber(ARGV[2]) then
  return {'stale'}
end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[1], '_begun', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[5] == 'poll' then
  local task = redis.call('HGET', KEYS[1], 'upstream_task_id')
  if task and task ~= 'null' and redis.call('HEXISTS', KEYS[1], '_relay_results') == 0 then
    redis.call('HINCRBY', KEYS[1], 'polls', 1)
  end
end
local out = {'ok'}
for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do table.insert(out, v) end
return out
