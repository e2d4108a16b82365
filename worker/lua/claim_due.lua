-- Hand out the jobs whose next step is due. Each gets a new dispatch token (only the
-- message carrying the latest token may act on the job) and a lease: unless its step
-- reschedules it first, the job is due again after the lease (a lost message, a killed
-- worker). Missing and finished jobs leave the schedule.
--
-- KEYS[1]  the schedule
-- ARGV[1]  prefix of job hash keys (the job id is appended)
-- ARGV[2]  most jobs to hand out
-- ARGV[3]  lease in seconds
-- Returns a flat list: job id, token, phase ('submit' or 'poll'), request JSON ('' for
-- 'poll'), due time; five entries per job.
local finished = {['"succeeded"'] = true, ['"failed"'] = true, ['"cancelled"'] = true}
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0,
  tonumber(ARGV[2]))
local out = {}
for i = 1, #due, 2 do
  local id, score = due[i], due[i + 1]
  local key = ARGV[1] .. id
  local state = redis.call('HGET', key, 'state')
  if (not state) or finished[state] then
    redis.call('ZREM', KEYS[1], id)
  else
    local token = redis.call('HINCRBY', key, '_dispatch', 1)
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), id)
    local task = redis.call('HGET', key, 'upstream_task_id')
    local phase, request = 'submit', redis.call('HGET', key, '_request') or ''
    if task and task ~= 'null' then phase, request = 'poll', '' end
    table.insert(out, id)
    table.insert(out, tostring(token))
    table.insert(out, phase)
    table.insert(out, request)
    table.insert(out, score)
  end
end
return out
