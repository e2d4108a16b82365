-- Hand out the archiving of succeeded jobs that is due, like claim_notify.lua does for
-- completion webhooks. Each gets a new archive token (only the message carrying the
-- latest one may archive) and a lease, as long as its step may take (ARGV[3] per result
-- image, plus ARGV[6]): unless its step records an outcome first, it is due again after
-- the lease, so a lost message or a worker killed mid-download costs a
-- delay, never the archive (nor the webhook that waits for it). Entries whose job is
-- gone, or whose archiving is no longer pending, leave.
--
-- An entry whose latest message may still be waiting in the archive queue (the queue's
-- oldest waiting message was sent no later than it) keeps its message: its lease is
-- renewed, so a fleet where nothing consumes the queue does not multiply it.
--
-- Archive steps share the fleet-wide limit of completion webhooks (claim_notify.lua):
-- steps and deliveries in flight together are at most ARGV[7] (half the fleet's worker
-- slots), so however slow the result hosts, submits and polls keep the other half. An
-- entry over the limit waits in the schedule, re-checked after a growing pause.
--
-- KEYS[1]  the archive schedule
-- KEYS[2]  every archive step in flight (sorted set: job id -> end of its lease)
-- KEYS[3]  every webhook delivery in flight (the same, for webhooks)
-- ARGV[1]  prefix of job hash keys (the job id is appended)
-- ARGV[2]  most entries to hand out
-- ARGV[3]  seconds the lease grows per result image (one download and one write)
-- ARGV[4]  send time of the oldest message waiting in the archive queue, '' when empty
-- ARGV[5]  seconds a message may be sent after its entry was handed out (a slow publish)
-- ARGV[6]  seconds the lease has besides the images (Redis work around the step)
-- ARGV[7]  most archive steps and webhook deliveries in flight in the whole fleet
-- ARGV[8]  first pause of an entry held back by that limit, in seconds
-- ARGV[9]  longest such pause
-- Returns a flat list: job id, token, '1' when this sends the entry again because its
-- last message or step was lost (else '0'); three entries each.
-- #include side_work.lua
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local per_image = tonumber(ARGV[3])
local lease_margin = tonumber(ARGV[6])
local head = tonumber(ARGV[4])
local margin = tonumber(ARGV[5])
local most_in_fleet = tonumber(ARGV[7])
local hold_first, hold_max = tonumber(ARGV[8]), tonumber(ARGV[9])

local function decoded(raw)
  if not raw then return nil end
  local ok, value = pcall(cjson.decode, raw)
  if ok then return value end
  return nil
end

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
if #due > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
for _, id in ipairs(due) do
  local key = ARGV[1] .. id
  local fields = redis.call('HMGET', key, 'archive', '_archive_sent_at', 'result_urls')
  local archive = decoded(fields[1])
  local sent_at = tonumber(fields[2])
  local urls = decoded(fields[3])
  local images = 1
  if type(urls) == 'table' and #urls > 1 then images = #urls end
  local lease = images * per_image + lease_margin
  if type(archive) ~= 'table' or archive.state ~= 'pending' then
    redis.call('ZREM', KEYS[1], id)
  elseif sent_at and head and head <= sent_at + margin then
    redis.call('ZADD', KEYS[1], now + lease, id)
  else
    redis.call('ZREM', KEYS[2], id)  -- its own earlier step, if any, was lost
    if side_work_in_flight(KEYS[2], KEYS[3], now) >= most_in_fleet then
      hold_back(KEYS[1], key, '_archive', id, now, hold_first, hold_max)
    else
      local token = hand_out(KEYS[1], KEYS[2], key, '_archive', id, now, lease)
      local lost = '0'
      if sent_at then lost = '1' end
      table.insert(out, id)
      table.insert(out, tostring(token))
      table.insert(out, lost)
    end
  end
end
return out
