-- Not a script: what claim_due.lua and resend_stranded.lua include (a line
-- `-- #include dispatch_view.lua`, replaced by this text when the script is loaded): how a
-- job of the schedule stands with its latest message.
-- KEYS and ARGV: none of its own; every key and value comes from its caller.

local FINISHED = {['"succeeded"'] = true, ['"failed"'] = true, ['"cancelled"'] = true}

-- The job's state, its next step ('submit' or 'poll'), its latest token, whether that
-- message's step began or parked the job, and when it was handed out (nil if unknown).
local function dispatch_view(key)
  local fields = redis.call('HMGET', key, 'state', 'upstream_task_id', '_dispatch', '_begun',
    '_parked', '_dispatched_at')
  local token = fields[3] or '0'
  local phase = 'submit'
  if fields[2] and fields[2] ~= 'null' then phase = 'poll' end
  return {
    state = fields[1],
    phase = phase,
    token = token,
    begun = fields[4] == token,
    parked = fields[5] == token,
    dispatched_at = tonumber(fields[6]),
  }
end

-- Whether the job's latest message may still wait in its queue: it has not begun, the job
-- was not parked since it was sent, and the queue's oldest waiting message (`oldest`:
-- phase -> its send time, nil when the queue is empty) was sent no later than the job's
-- message (queues are first in, first out; `margin`: a slow publish).
local function may_still_wait(job, oldest, margin)
  local head = oldest[job.phase]
  return (not job.begun) and (not job.parked) and head ~= nil
    and head <= (job.dispatched_at or 0) + margin
end
