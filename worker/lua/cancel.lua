-- Cancel a job that was never sent upstream. The same record fields that decide whether a
-- submit may open a createTask attempt (attempt_begin.lua) decide here, atomically: a job
-- with an upstream task, with an attempt open, or with an attempt of unknown outcome (the
-- upstream may have accepted it) cannot be cancelled. A cancelled job leaves the
-- schedule and its waiting line (lines.lua), its id is published on the finished channel and its webhook becomes due.
--
-- KEYS[1]  the job's hash
-- KEYS[2]  the schedule
-- KEYS[3..8] the state indexes: queued, submitted, running, succeeded, failed, cancelled
-- KEYS[9]  the schedule of completion webhooks
-- KEYS[10] the archive schedule (not used)
-- KEYS[11] the waiting counts (see tenant_state.lua)
-- ARGV[1]  job id
-- ARGV[2]  time to live of the record, in seconds
-- ARGV[3]  the finished channel
-- ARGV[4]  JSON text of the cancellation message (fail_msg)
-- Returns 'cancelled', 'already' (it was cancelled before), 'finished' (it ended
-- otherwise), 'accepted', 'sending', 'unknown_outcome' or 'missing'.
-- #include tenant_state.lua
-- #include lines.lua
local index = {['"queued"'] = 3, ['"submitted"'] = 4, ['"running"'] = 5}
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == '"cancelled"' then return 'already' end
if not index[state] then return 'finished' end
local task = redis.call('HGET', KEYS[1], 'upstream_task_id')
if task and task ~= 'null' then return 'accepted' end
local open = redis.call('HGET', KEYS[1], '_attempt')
if open and open ~= 'null' then return 'sending' end
if tonumber(redis.call('HGET', KEYS[1], 'unknown_outcomes') or '0') > 0 then
  return 'unknown_outcome'
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local created = tonumber(redis.call('HGET', KEYS[1], 'created_at')) or 0
redis.call('HSET', KEYS[1], 'state', '"cancelled"', 'fail_code', '"cancelled"',
  'fail_msg', ARGV[4], 'finished_at', string.format('%.6f', now))
redis.call('ZREM', KEYS[index[state]], ARGV[1])
redis.call('ZADD', KEYS[8], created, ARGV[1])
tenant_moved(KEYS[1], ARGV[1], cjson.decode(state), 'cancelled', created, KEYS[11])
redis.call('ZREM', KEYS[2], ARGV[1])
line_leave(KEYS[1], ARGV[1])
local notify = redis.call('HGET', KEYS[1], '_notify_url')
if notify and notify ~= 'null' then
  redis.call('HSET', KEYS[1], 'notification', cjson.encode({state = 'pending', attempts = 0}))
  redis.call('ZADD', KEYS[9], now, ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 'cancelled'
