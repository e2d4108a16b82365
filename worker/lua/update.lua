-- Write fields of a job and move its state forward, never back: queued -> submitted ->
-- running -> succeeded | failed | cancelled; nothing changes once it has finished.
-- Optionally only for the holder of a dispatch token, and optionally setting when the
-- job's next step is due (the token's step has then parked the job: see claim_due.lua).
-- A job that finishes leaves the schedule and its waiting line (lines.lua), its id is published on the finished channel,
-- and its completion webhook (if it has one) becomes due. With archiving on, a job that
-- succeeds is put in the archive schedule instead, and its webhook waits for the end of
-- archiving (archive_end.lua schedules it).
--
-- KEYS[1]  the job's hash
-- KEYS[2]  the schedule
-- KEYS[3..8] the state indexes: queued, submitted, running, succeeded, failed, cancelled
-- KEYS[9]  the schedule of completion webhooks
-- KEYS[10] the archive schedule
-- KEYS[11] the waiting counts (see tenant_state.lua)
-- ARGV[1]  job id
-- ARGV[2]  time to live of the record, in seconds
-- ARGV[3]  new state, or '' to keep it
-- ARGV[4]  dispatch token the caller holds, or '' to write regardless
-- ARGV[5]  seconds until the next step is due, or '' to leave the schedule as it is
-- ARGV[6]  the finished channel
-- ARGV[7]  '1' when a job that succeeds is to be archived, else ''
-- ARGV[8..] field, JSON value, field, JSON value, ...
-- Returns 1 written, 0 refused (finished, or the state would go back), -1 no such job,
-- -2 the token is stale.
-- #include tenant_state.lua
-- #include lines.lua
local rank = {['"queued"'] = 0, ['"submitted"'] = 1, ['"running"'] = 2,
  ['"succeeded"'] = 3, ['"failed"'] = 3, ['"cancelled"'] = 3}
local index = {['"queued"'] = 3, ['"submitted"'] = 4, ['"running"'] = 5,
  ['"succeeded"'] = 6, ['"failed"'] = 7, ['"cancelled"'] = 8}
local raw = redis.call('HGET', KEYS[1], 'state')
if not raw then return -1 end
local current = rank[raw]
if current == 3 then return 0 end
if ARGV[4] ~= '' and
    tonumber(redis.call('HGET', KEYS[1], '_dispatch') or '0') ~= tonumber(ARGV[4]) then
  return -2
end
local wanted = current
if ARGV[3] ~= '' then
  local encoded = '"' .. ARGV[3] .. '"'
  wanted = rank[encoded]
  if wanted == nil or wanted < current then return 0 end
  redis.call('HSET', KEYS[1], 'state', encoded)
  if encoded ~= raw then
    local created = tonumber(redis.call('HGET', KEYS[1], 'created_at')) or 0
    redis.call('ZREM', KEYS[index[raw]], ARGV[1])
    redis.call('ZADD', KEYS[index[encoded]], created, ARGV[1])
    tenant_moved(KEYS[1], ARGV[1], cjson.decode(raw), ARGV[3], created, KEYS[11])
  end
end
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if wanted == 3 then
  redis.call('HSET', KEYS[1], 'finished_at', string.format('%.6f', now),
    '_attempt', 'null', 'attempt_started_at', 'null')
  redis.call('ZREM', KEYS[2], ARGV[1])
  line_leave(KEYS[1], ARGV[1])
  local archive = ARGV[7] == '1' and redis.call('HGET', KEYS[1], 'state') == '"succeeded"'
  if archive then
    redis.call('HSET', KEYS[1], 'archive', cjson.encode({state = 'pending', attempts = 0}))
    redis.call('ZADD', KEYS[10], now, ARGV[1])
  end
  local notify = redis.call('HGET', KEYS[1], '_notify_url')
  if notify and notify ~= 'null' then
    redis.call('HSET', KEYS[1], 'notification', cjson.encode({state = 'pending', attempts = 0}))
    if not archive then redis.call('ZADD', KEYS[9], now, ARGV[1]) end
  end
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('PUBLISH', ARGV[6], ARGV[1])
  return 1
elseif ARGV[5] ~= '' then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[1])
  if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], '_parked', ARGV[4]) end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
