-- Hand out the archiving of succeeded jobs that is due, like claim_notify.lua does for
-- completion webhooks. Each gets a new archive token (only the message carrying the
-- latest one may archive) and a lease, as long as its step may take (ARGV[8] per result
-- image, plus ARGV[9]): unless its step records an outcome first, it is due again after
-- the lease, so a lost message or a worker killed mid-download costs a
-- delay, never the archive (nor the webhook that waits for it). Entries whose job is
-- gone, or whose archiving is no longer pending, leave.
--
-- An entry whose latest message may still be waiting in the archive queue (the queue's
-- oldest waiting message was sent no later than it) keeps its message: its lease is
-- renewed, so a fleet where nothing consumes the queue does not multiply it.
--
-- Archive steps share the fleet-wide limit of completion webhooks (claim_notify.lua):
-- steps and deliveries in flight together are at most ARGV[5] (half the fleet's worker
-- slots), so however slow the result hosts, submits and polls keep the other half. An
-- entry over the limit waits in the schedule, re-checked after a growing pause.
--
-- KEYS[1]  the archive schedule
-- KEYS[2]  every archive step in flight (sorted set: job id -> end of its lease)
-- KEYS[3]  every webhook delivery in flight (the same, for webhooks)
-- ARGV[1]  prefix of job hash keys (the job id is appended)
-- ARGV[2]  most entries to hand out
-- ARGV[3]  send time of the oldest message waiting in the archive queue, '' when empty
-- ARGV[4]  seconds a message may be sent after its entry was handed out (a slow publish)
-- ARGV[5]  most archive steps and webhook deliveries in flight in the whole fleet
-- ARGV[6]  first pause of an entry held back by that limit, in seconds
-- ARGV[7]  longest such pause
-- ARGV[8]  seconds the lease grows per result image (one download and one write)
-- ARGV[9]  seconds the lease has besides the images (Redis work around the step)
-- Returns a flat list: job id, token, '1' when this sends the entry again because its
-- last message or step was lost (else '0'); three entries each.
-- #include side_work.lua
local t = redis.call('TIME')
local per_image, lease_margin = tonumber(ARGV[8]), tonumber(ARGV[9])

local function read(key)
  local fields = redis.call('HMGET', key, 'archive', '_archive_sent_at', 'result_urls')
  local archive = decoded(fields[1])
  if type(archive) ~= 'table' or archive.state ~= 'pending' then return nil end
  local urls = decoded(fields[3])
  local images = 1
  if type(urls) == 'table' and #urls > 1 then images = #urls end
  return {sent_at = tonumber(fields[2]), lease = images * per_image + lease_margin}
end

local function handed(out, id, entry, token, lost)
  table.insert(out, id)
  table.insert(out, tostring(token))
  table.insert(out, lost)
end

return claim_side_work(tonumber(t[1]) + tonumber(t[2]) / 1e6, {
  prefix = '_archive', read = read, held = function() return false end, handed = handed,
})
