-- Record the outcome of one archiving try of a succeeded job. This runs after the job
-- finished, when update.lua refuses every write, so it has its own script; it writes
-- only `archive`, `archived` and the internal archive fields, never the job's state or
-- results, and it keeps the record's time to live. When archiving ends (done or given
-- up) the job's completion webhook, waiting for it, becomes due: a crash between the
-- two cannot happen, they are one script.
--
-- An outcome retires the token it was recorded with, so a second copy of the same
-- message (a broker redelivery) records nothing; and an archive that ended (done or
-- failed) never changes again.
--
-- KEYS[1]  the job's hash
-- KEYS[2]  the archive schedule
-- KEYS[3]  the schedule of completion webhooks
-- KEYS[4]  every archive step in flight (sorted set: job id -> end of its lease)
-- ARGV[1]  job id
-- ARGV[2]  archive token the step held
-- ARGV[3]  outcome: 'done', 'retry', 'failed', or 'dropped' (nothing to archive)
-- ARGV[4]  JSON of the new `archive` ('' for 'dropped')
-- ARGV[5]  JSON of the new `archived` list ('' to leave it)
-- ARGV[6]  seconds until the next try ('retry' only)
-- Returns 'ok', 'stale' (a newer message owns the entry, or this token already recorded
-- an outcome, or archiving has ended) or 'missing' (no such job).
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
  return 'missing'
end
if (tonumber(redis.call('HGET', KEYS[1], '_archive_token')) or 0) ~= tonumber(ARGV[2]) then
  return 'stale'
end
redis.call('ZREM', KEYS[4], ARGV[1])
local ok_now, current = pcall(cjson.decode, redis.call('HGET', KEYS[1], 'archive') or 'null')
local ended = ok_now and type(current) == 'table' and current.state ~= 'pending'
if ended and ARGV[3] ~= 'dropped' then
  return 'stale'
end
redis.call('HINCRBY', KEYS[1], '_archive_token', 1)
redis.call('HSET', KEYS[1], '_archive_sent_at', 'null')
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local outcome = ARGV[3]
if outcome ~= 'dropped' then
  redis.call('HSET', KEYS[1], 'archive', ARGV[4])
  if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'archived', ARGV[5]) end
end
if outcome == 'retry' then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[1])
  return 'ok'
end
redis.call('ZREM', KEYS[2], ARGV[1])
local ok, note = pcall(cjson.decode, redis.call('HGET', KEYS[1], 'notification') or 'null')
local url = redis.call('HGET', KEYS[1], '_notify_url')
if ok and type(note) == 'table' and note.state == 'pending' and url and url ~= 'null' then
  redis.call('ZADD', KEYS[3], now, ARGV[1])
end
return 'ok'
