-- Hand out the jobs whose next step is due. Each gets a new dispatch token (only the
-- message carrying the latest token may act on the job) and a lease: unless its step
-- reschedules it first, the job is due again after the lease. Missing and finished jobs
-- leave the schedule.
--
-- A job whose latest message may still be waiting in its queue is left to that message
-- (its lease is renewed), so that an overloaded fleet does not multiply its backlog. It
-- may be waiting when the message has not begun, the job was not parked since it was
-- sent, and the queue's oldest waiting message was sent no later than the job's message
-- (queues are first in, first out). Otherwise the message is gone and the job is sent
-- again.
--
-- KEYS[1]  the schedule
-- ARGV[1]  prefix of job hash keys (the job id is appended)
-- ARGV[2]  most jobs to hand out
-- ARGV[3]  lease in seconds
-- ARGV[4]  send time of the oldest message waiting in the submit queue, '' when empty
-- ARGV[5]  the same for the poll queue
-- ARGV[6]  seconds a message may be sent after its job was handed out (a slow publish)
-- Returns a flat list: job id, token, phase ('submit' or 'poll'), request JSON ('' for
-- 'poll'), due time, '1' when this sends the job again because its last step or message
-- was lost (else '0'); six entries per job.
-- #include dispatch_view.lua
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local lease = tonumber(ARGV[3])
local oldest = {submit = tonumber(ARGV[4]), poll = tonumber(ARGV[5])}
local margin = tonumber(ARGV[6])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0,
  tonumber(ARGV[2]))
local out = {}
for i = 1, #due, 2 do
  local id, score = due[i], due[i + 1]
  local key = ARGV[1] .. id
  local job = dispatch_view(key)
  if (not job.state) or FINISHED[job.state] then
    redis.call('ZREM', KEYS[1], id)
  elseif may_still_wait(job, oldest, margin) then
    redis.call('ZADD', KEYS[1], now + lease, id)
  else
    local lost = '0'
    if not job.parked then lost = '1' end
    local next_token = redis.call('HINCRBY', key, '_dispatch', 1)
    redis.call('HSET', key, '_dispatched_at', string.format('%.6f', now))
    redis.call('ZADD', KEYS[1], now + lease, id)
    local request = ''
    if job.phase == 'submit' then request = redis.call('HGET', key, '_request') or '' end
    table.insert(out, id)
    table.insert(out, tostring(next_token))
    table.insert(out, job.phase)
    table.insert(out, request)
    table.insert(out, score)
    table.insert(out, lost)
  end
end
return out
