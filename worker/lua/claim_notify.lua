-- Hand out the completion webhooks that are due, like claim_due.lua does for job steps.
-- Each gets a new webhook token (only the message carrying the latest one may deliver)
-- and a lease: unless its delivery records an outcome first, it is due again after the
-- lease, so a lost message or a worker killed mid-delivery costs a delay, never the
-- webhook. Entries whose job is gone, or whose webhook is no longer pending, leave.
--
-- A webhook whose latest message may still be waiting in the notify queue (the queue's
-- oldest waiting message was sent no later than it) keeps its message: its lease is
-- renewed, so a fleet where nothing consumes the queue does not multiply it.
--
-- Receivers are protected from us and the pipeline from them: at most
-- min(ARGV[11], 1 + streak) deliveries are in flight to one receiver (scheme://host:port),
-- where streak counts its 2xx answers in a row (0 after any failure), and at most ARGV[5]
-- in the whole fleet (half its worker slots). A new or failing receiver gets one delivery
-- at a time, so one that hangs holds at most one worker slot, and all of them together
-- never hold more than half; a webhook over a limit waits in the schedule, re-checked
-- after a growing pause. Archive steps in flight (claim_archive.lua) count in the
-- fleet-wide limit too: webhooks and archiving together hold at most half the slots.
--
-- KEYS[1]  the schedule of completion webhooks
-- KEYS[2]  every delivery in flight (sorted set: job id -> end of its lease)
-- KEYS[3]  every archive step in flight (the same, for archiving)
-- ARGV[1]  prefix of job hash keys (the job id is appended)
-- ARGV[2]  most webhooks to hand out
-- ARGV[3]  send time of the oldest message waiting in the notify queue, '' when empty
-- ARGV[4]  seconds a message may be sent after its webhook was handed out (a slow publish)
-- ARGV[5]  most deliveries and archive steps in flight in the whole fleet
-- ARGV[6]  first pause of a webhook held back by a limit, in seconds
-- ARGV[7]  longest such pause
-- ARGV[8]  lease in seconds
-- ARGV[9]  prefix of receiver state hashes (the receiver is appended)
-- ARGV[10] prefix of receiver in-flight sorted sets (the receiver is appended)
-- ARGV[11] most deliveries in flight to one receiver
-- Returns a flat list: job id, token, receiver, due time, '1' when this sends the webhook
-- again because its last message or delivery was lost (else '0'); five entries each.
-- #include side_work.lua
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local lease = tonumber(ARGV[8])
local most_in_flight = tonumber(ARGV[11])

local function receiver_of(url)
  local origin = string.match(url, '^[%a][%w+.-]*://[^/?#]*')
  return string.lower(origin or '?')
end

local function read(key)
  local fields = redis.call('HMGET', key, 'notification', '_notify_url', '_notify_sent_at')
  local notification, url = decoded(fields[1]), decoded(fields[2])
  if type(notification) ~= 'table' or notification.state ~= 'pending'
      or type(url) ~= 'string' then
    return nil
  end
  local receiver = receiver_of(url)
  return {sent_at = tonumber(fields[3]), lease = lease, receiver = receiver,
    busy = ARGV[10] .. receiver}
end

-- The receiver's own limit, counted after its expired leases (and this webhook's) leave.
local function held(id, entry)
  redis.call('ZREMRANGEBYSCORE', entry.busy, '-inf', now)
  redis.call('ZREM', entry.busy, id)
  local streak = tonumber(redis.call('HGET', ARGV[9] .. entry.receiver, 'streak')) or 0
  return redis.call('ZCARD', entry.busy) >= math.min(most_in_flight, 1 + streak)
end

local function handed(out, id, entry, token, lost, score)
  redis.call('ZADD', entry.busy, now + lease, id)
  redis.call('EXPIRE', entry.busy, math.ceil(lease) + 60)
  table.insert(out, id)
  table.insert(out, tostring(token))
  table.insert(out, entry.receiver)
  table.insert(out, score)
  table.insert(out, lost)
end

return claim_side_work(now, {prefix = '_notify', read = read, held = held, handed = handed})
