-- Record the upstream task an attempt created. The first one becomes the job's task: the
-- job moves to submitted and its first poll is scheduled. A different task arriving for a
-- job that already has one (or has finished) is a further charge: it is kept in
-- extra_task_ids and flags the job possibly_paid_twice; state and results do not change.
-- Every task recorded is indexed (task id -> job id), for callbacks. A job waiting in its
-- line (lines.lua) leaves it.
--
-- KEYS[1]  the job's hash
-- KEYS[2]  the schedule
-- KEYS[3]  the task's index key (its value is the job id)
-- KEYS[4]  the index of queued jobs
-- KEYS[5]  the index of submitted jobs
-- KEYS[6]  the waiting counts (see tenant_state.lua)
-- ARGV[1]  job id
-- ARGV[2]  attempt id ('' when the task comes from elsewhere: an adopted callback)
-- ARGV[3]  upstream task id
-- ARGV[4]  seconds until the first poll
-- ARGV[5]  time to live of the record, in seconds
-- Returns 'accepted', 'accepted_after_unknown' (another attempt, of unknown outcome, may
-- have created a task too: possibly paid twice), 'again' (this task was recorded before),
-- 'extra' or 'missing'. An adopted task (attempt id '') closes any open attempt: its owner's
-- own answer then finds the job's task set ('again', or 'extra' for another task).
-- #include tenant_state.lua
-- #include lines.lua
local finished = {['"succeeded"'] = true, ['"failed"'] = true, ['"cancelled"'] = true}
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
local task = cjson.encode(ARGV[3])
local open = redis.call('HGET', KEYS[1], '_attempt')
if ARGV[2] == '' or open == cjson.encode(ARGV[2]) then
  if open and open ~= 'null' then
    redis.call('HSET', KEYS[1], '_attempt', 'null', 'attempt_started_at', 'null')
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[5])
local current = redis.call('HGET', KEYS[1], 'upstream_task_id')
if current == task then return 'again' end
if (current and current ~= 'null') or finished[state] then
  local extra = cjson.decode(redis.call('HGET', KEYS[1], 'extra_task_ids') or '[]')
  for _, known in ipairs(extra) do
    if known == ARGV[3] then return 'again' end
  end
  table.insert(extra, ARGV[3])
  redis.call('HSET', KEYS[1], 'extra_task_ids', cjson.encode(extra))
  if current and current ~= 'null' then
    redis.call('HSET', KEYS[1], 'possibly_paid_twice', 'true')
  end
  return 'extra'
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', KEYS[1], 'upstream_task_id', task, 'submitted_at',
  string.format('%.6f', now), '_grant', 'null', '_last_error', 'null')
line_leave(KEYS[1], ARGV[1])
if state == '"queued"' then
  local created = tonumber(redis.call('HGET', KEYS[1], 'created_at')) or 0
  redis.call('HSET', KEYS[1], 'state', '"submitted"')
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('ZADD', KEYS[5], created, ARGV[1])
  tenant_moved(KEYS[1], ARGV[1], 'queued', 'submitted', created, KEYS[6])
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
redis.call('HSET', KEYS[1], '_parked', redis.call('HGET', KEYS[1], '_dispatch') or '0')
-- Other requests that may have created a task too, beside the one recorded now: every
-- attempt of unknown outcome, and (for an adopted task) an attempt that was still open.
-- An adopted task was created by one of those, not by a request of its own: one fewer.
-- A worker's own task is its open attempt's.
local others = tonumber(redis.call('HGET', KEYS[1], 'unknown_outcomes') or '0')
if ARGV[2] == '' and not (open and open ~= 'null') then others = others - 1 end
if others > 0 then
  redis.call('HSET', KEYS[1], 'possibly_paid_twice', 'true')
  return 'accepted_after_unknown'
end
return 'accepted'
