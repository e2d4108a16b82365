-- Pick the jobs that get the send moments just granted to one provider's key, and hand
-- each out (a new dispatch token and a lease, as claim_due.lua does). Strictly by class
-- (interactive, normal, bulk); inside a class the tenant with the lowest pass (lines.lua),
-- whose pass then grows by 1 / its weight; inside a tenant's line, first in first out. A
-- job that finished or was accepted meanwhile leaves its line without taking a moment.
--
-- KEYS[1]  the schedule
-- ARGV[1]  prefix of job hash keys (the job id is appended)
-- ARGV[2]  the provider's lines' base (keys.lines_base)
-- ARGV[3]  lease in seconds
-- ARGV[4]  the number of tenant weights N; ARGV[5..4+2N]: tenant, weight (others weigh 1)
-- ARGV[5+2N..]  the members of the granted moments, one per job to pick
-- Returns a flat list, six entries per picked job, as claim_due.lua's: job id, token,
-- 'submit', request JSON, now, '0'.
-- #include lines.lua
local CLASSES = {'interactive', 'normal', 'bulk'}
local MAX_SKIPPED = 1000
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local base, lease = ARGV[2], tonumber(ARGV[3])
local weights, n = {}, tonumber(ARGV[4])
for i = 0, n - 1 do weights[ARGV[5 + 2 * i]] = tonumber(ARGV[6 + 2 * i]) end
local picks_key = base .. 'picks:' .. math.floor(now / 60)

-- The next job in line (its id, class and tenant), taken out of the line; nil when none.
local function next_in_line()
  for _, class in ipairs(CLASSES) do
    local head = redis.call('ZRANGE', base .. class, 0, 0, 'WITHSCORES')
    if head[1] then
      local tenant, pass = head[1], tonumber(head[2])
      local line = base .. class .. ':' .. tenant
      local job = redis.call('ZPOPMIN', line)
      redis.call('HSET', base .. 'passes', class, pass)
      local after = pass + 1 / (weights[tenant] or 1)
      if job[1] then redis.call('DECR', base .. 'count') end
      if redis.call('ZCARD', line) == 0 then
        line_idle(base, class, tenant, after)
      else
        redis.call('ZADD', base .. class, after, tenant)
      end
      return job[1], class, tenant
    end
  end
  return nil
end

local out, skipped = {}, 0
local grant = 5 + 2 * n
while grant <= #ARGV and skipped <= MAX_SKIPPED do
  local id, class, tenant = next_in_line()
  if not id then break end
  local key = ARGV[1] .. id
  local fields = redis.call('HMGET', key, 'state', 'upstream_task_id')
  if fields[1] == '"queued"' and ((not fields[2]) or fields[2] == 'null') then
    local token = redis.call('HINCRBY', key, '_dispatch', 1)
    redis.call('HSET', key, '_dispatched_at', string.format('%.6f', now), '_line', 'null',
      '_grant', cjson.encode(ARGV[grant]))
    redis.call('ZADD', KEYS[1], now + lease, id)
    redis.call('HINCRBY', picks_key, class .. ':' .. tenant, 1)
    for _, v in ipairs({id, tostring(token), 'submit', redis.call('HGET', key, '_request') or '',
        string.format('%.6f', now), '0'}) do
      table.insert(out, v)
    end
    grant = grant + 1
  else
    if fields[1] then redis.call('HSET', key, '_line', 'null') end
    skipped = skipped + 1
  end
end
redis.call('EXPIRE', picks_key, 7200)
return out
