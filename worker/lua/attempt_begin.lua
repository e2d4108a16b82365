-- Open a createTask attempt for a job, unless the job was already accepted upstream or
-- another attempt may still be in flight. An open attempt older than the settle time
-- never recorded its outcome: it is counted as unknown and a new one may start; but
-- with upstream callbacks on, not before the callback wait has passed since the last
-- unknown outcome (the upstream may yet call back with the task that attempt created).
-- The attempt id is the owner's token: opening the same id twice is harmless.
-- Opening an attempt consumes the job's spend reservation ('_spend', see
-- worker/spendcap.py) in the same step: it is handed to the caller (to give back if the
-- upstream refuses) and cleared, so that a later attempt reserves its own.
--
-- KEYS[1]  the job's hash
-- KEYS[2]  (optional) the set of jobs held for the job's key: an opened attempt leaves it
-- ARGV[1]  attempt id
-- ARGV[2]  settle time in seconds
-- ARGV[3]  time to live of the record, in seconds
-- ARGV[4]  'open' to open the attempt, 'settle' only to close a settled earlier one
-- ARGV[5]  seconds to wait for a callback after an unknown outcome (0: callbacks off)
-- ARGV[6]  the job id (the member of KEYS[2])
-- Returns {'ok', 1 if an earlier attempt was just counted unknown else 0, the spend
-- reservation consumed (JSON, 'null' for none)},
-- {'accepted'}, {'finished'}, {'missing'}, {'open', seconds until it settles} or
-- {'await_callback', seconds left, 1 if an earlier attempt was just counted unknown}.
-- With 'settle', 'ok' means no attempt is open any more (none was opened).
local finished = {['"succeeded"'] = true, ['"failed"'] = true, ['"cancelled"'] = true}
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing'} end
if finished[state] then return {'finished'} end
local task = redis.call('HGET', KEYS[1], 'upstream_task_id')
if task and task ~= 'null' then return {'accepted'} end
local mine = cjson.encode(ARGV[1])
local open = redis.call('HGET', KEYS[1], '_attempt')
local function unhold()
  if KEYS[2] then redis.call('SREM', KEYS[2], ARGV[6]) end
end
if open == mine then
  unhold()
  return {'ok', 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local marked = 0
if open and open ~= 'null' then
  local started = tonumber(redis.call('HGET', KEYS[1], 'attempt_started_at')) or 0
  local left = started + tonumber(ARGV[2]) - now
  if left > 0 then return {'open', tostring(left)} end
  redis.call('HINCRBY', KEYS[1], 'unknown_outcomes', 1)
  redis.call('HSET', KEYS[1], '_attempt', 'null', 'attempt_started_at', 'null',
    '_unknown_at', string.format('%.6f', now))
  marked = 1
end
if ARGV[4] == 'settle' then return {'ok', marked} end
local wait = tonumber(ARGV[5]) or 0
local unknown_at = tonumber(redis.call('HGET', KEYS[1], '_unknown_at') or '')
if wait > 0 and unknown_at and unknown_at + wait > now then
  return {'await_callback', tostring(unknown_at + wait - now), marked}
end
local spend = redis.call('HGET', KEYS[1], '_spend') or 'null'
redis.call('HSET', KEYS[1], '_attempt', mine, 'attempt_started_at', string.format('%.6f', now),
  '_spend', 'null')
redis.call('HINCRBY', KEYS[1], 'submit_attempts', 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
unhold()
return {'ok', marked, spend}
