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
-- KEYS[1]  the archive schedule
-- ARGV[1]  prefix of job hash keys (the job id is appended)
-- ARGV[2]  most entries to hand out
-- ARGV[3]  seconds the lease grows per result image (one download and one write)
-- ARGV[4]  send time of the oldest message waiting in the archive queue, '' when empty
-- ARGV[5]  seconds a message may be sent after its entry was handed out (a slow publish)
-- ARGV[6]  seconds the lease has besides the images (Redis work around the step)
-- Returns a flat list: job id, token, '1' when this sends the entry again because its
-- last message or step was lost (else '0'); three entries each.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local per_image = tonumber(ARGV[3])
local lease_margin = tonumber(ARGV[6])
local head = tonumber(ARGV[4])
local margin = tonumber(ARGV[5])

local function decoded(raw)
  if not raw then return nil end
  local ok, value = pcall(cjson.decode, raw)
  if ok then return value end
  return nil
end

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
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
    local token = redis.call('HINCRBY', key, '_archive_token', 1)
    redis.call('HSET', key, '_archive_sent_at', string.format('%.6f', now))
    redis.call('ZADD', KEYS[1], now + lease, id)
    local lost = '0'
    if sent_at then lost = '1' end
    table.insert(out, id)
    table.insert(out, tostring(token))
    table.insert(out, lost)
  end
end
return out
