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
-- min(ARGV[8], 1 + streak) deliveries are in flight to one receiver (scheme://host:port),
-- where streak counts its 2xx answers in a row (0 after any failure), and at most ARGV[11]
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
-- ARGV[2]  prefix of receiver state hashes (the receiver is appended)
-- ARGV[3]  prefix of receiver in-flight sorted sets (the receiver is appended)
-- ARGV[4]  most webhooks to hand out
-- ARGV[5]  lease in seconds
-- ARGV[6]  send time of the oldest message waiting in the notify queue, '' when empty
-- ARGV[7]  seconds a message may be sent after its webhook was handed out (a slow publish)
-- ARGV[8]  most deliveries in flight to one receiver
-- ARGV[9]  first pause of a webhook held back by its receiver's limit, in seconds
-- ARGV[10] longest such pause
-- ARGV[11] most deliveries and archive steps in flight in the whole fleet
-- Returns a flat list: job id, token, receiver, due time, '1' when this sends the webhook
-- again because its last message or delivery was lost (else '0'); five entries each.
-- #include side_work.lua
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local lease = tonumber(ARGV[5])
local head = tonumber(ARGV[6])
local margin = tonumber(ARGV[7])
local most_in_flight = tonumber(ARGV[8])
local hold_first, hold_max = tonumber(ARGV[9]), tonumber(ARGV[10])
local most_in_fleet = tonumber(ARGV[11])

local function decoded(raw)
  if not raw then return nil end
  local ok, value = pcall(cjson.decode, raw)
  if ok then return value end
  return nil
end

local function receiver_of(url)
  local origin = string.match(url, '^[%a][%w+.-]*://[^/?#]*')
  return string.lower(origin or '?')
end

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0,
  tonumber(ARGV[4]))
local out = {}
if #due > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
for i = 1, #due, 2 do
  local id, score = due[i], due[i + 1]
  local key = ARGV[1] .. id
  local fields = redis.call('HMGET', key, 'notification', '_notify_url', '_notify_sent_at')
  local notification, url = decoded(fields[1]), decoded(fields[2])
  local sent_at = tonumber(fields[3])
  if type(notification) ~= 'table' or notification.state ~= 'pending'
      or type(url) ~= 'string' then
    redis.call('ZREM', KEYS[1], id)
  elseif sent_at and head and head <= sent_at + margin then
    redis.call('ZADD', KEYS[1], now + lease, id)
  else
    local receiver = receiver_of(url)
    local busy = ARGV[3] .. receiver
    redis.call('ZREMRANGEBYSCORE', busy, '-inf', now)
    redis.call('ZREM', busy, id)
    redis.call('ZREM', KEYS[2], id)
    local streak = tonumber(redis.call('HGET', ARGV[2] .. receiver, 'streak')) or 0
    if redis.call('ZCARD', busy) >= math.min(most_in_flight, 1 + streak)
        or side_work_in_flight(KEYS[2], KEYS[3], now) >= most_in_fleet then
      hold_back(KEYS[1], key, '_notify', id, now, hold_first, hold_max)
    else
      local token = hand_out(KEYS[1], KEYS[2], key, '_notify', id, now, lease)
      redis.call('ZADD', busy, now + lease, id)
      redis.call('EXPIRE', busy, math.ceil(lease) + 60)
      local lost = '0'
      if sent_at then lost = '1' end
      table.insert(out, id)
      table.insert(out, tostring(token))
      table.insert(out, receiver)
      table.insert(out, score)
      table.insert(out, lost)
    end
  end
end
return out
