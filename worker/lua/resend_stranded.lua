-- After an outage of the broker (or of this Redis): make due at once, to be sent again,
-- the jobs whose latest message was handed out before the outage, has not begun and cannot
-- be waiting in its queue any more. Such a message was taken by a worker whose broker
-- connection then broke: the worker drops messages it had not started when its connection
-- goes, and they come back only after the broker's visibility timeout; a message popped in
-- the instant the broker went down may be gone altogether. Without this the job would
-- wait for its lease.
--
-- A handed-out job is scheduled at most one lease ahead, so only that part of the schedule
-- is read, one page per call (so that a big schedule does not block Redis). A job whose
-- message may still be waiting in its queue (the test claim_due.lua applies) is left
-- alone. The others are marked parked (like due_now.lua), so the next claim sends them
-- whatever the queues hold.
--
-- KEYS[1]  the schedule
-- ARGV[1]  prefix of job hash keys (the job id is appended)
-- ARGV[2]  lease in seconds
-- ARGV[3]  only jobs handed out before this time (fleet clock); '' for now
-- ARGV[4]  send time of the oldest message waiting in the submit queue, '' when empty
-- ARGV[5]  the same for the poll queue
-- ARGV[6]  seconds a message may be sent after its job was handed out (a slow publish)
-- ARGV[7]  how many jobs of that part of the schedule to skip (the pages read before)
-- ARGV[8]  most jobs to read
-- Returns {jobs made due, jobs read}; the next page skips the jobs read and not made due.
-- #include dispatch_view.lua
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local lease = tonumber(ARGV[2])
local before = tonumber(ARGV[3]) or now
local oldest = {submit = tonumber(ARGV[4]), poll = tonumber(ARGV[5])}
local margin = tonumber(ARGV[6])
local ahead = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, now + lease, 'LIMIT',
  tonumber(ARGV[7]), tonumber(ARGV[8]))
local count = 0
for _, id in ipairs(ahead) do
  local key = ARGV[1] .. id
  local job = dispatch_view(key)
  if job.state and not FINISHED[job.state] and job.dispatched_at and job.dispatched_at < before
      and not job.begun and not job.parked and not may_still_wait(job, oldest, margin) then
    redis.call('ZADD', KEYS[1], now, id)
    redis.call('HSET', key, '_parked', job.token)
    count = count + 1
  end
end
return {count, #ahead}
