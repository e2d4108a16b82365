-- Not a script: what create.lua, line_join.lua, release_held.lua, pick.lua, update.lua and
-- cancel.lua include: the waiting lines of jobs that wait for a send moment of their
-- provider's key (worker/store/lines.py; the key names: worker/keys.py, LINES_PREFIX).
-- KEYS and ARGV: none of its own; the lines' keys are derived from the prefix the caller
-- passes and the job's provider, priority and tenant (one Redis server holds them all).
--
-- A tenant's pass is its virtual time in its class: each pick adds 1 / weight to it, the
-- tenant with the lowest pass is picked next, and a tenant that comes back after its line
-- emptied starts at the class's virtual time (or its own last pass, if later), so that
-- idling earns no credit.

local function line_field(job_key, name, default)
  local raw = redis.call('HGET', job_key, name)
  if (not raw) or raw == 'null' then return default end
  return cjson.decode(raw)
end

-- Put a job in its line at its place (when it was created); the job's '_line' field says
-- where it waits. Returns 1 when it was not in it yet.
local function line_join(prefix, job_key, job_id)
  local provider = line_field(job_key, 'provider', 'kie')
  local class = line_field(job_key, 'priority', 'normal')
  local tenant = line_field(job_key, 'tenant', 'default')
  local place = tonumber(redis.call('HGET', job_key, 'created_at')) or 0
  local base = prefix .. provider .. ':'
  local added = redis.call('ZADD', base .. class .. ':' .. tenant, 'NX', place, job_id)
  if added == 1 then redis.call('INCR', base .. 'count') end
  redis.call('HSET', job_key, '_line', cjson.encode({base, class, tenant}))
  if not redis.call('ZSCORE', base .. class, tenant) then
    local last = tonumber(redis.call('HGET', base .. 'passes', class .. ':' .. tenant) or '0')
    local now = tonumber(redis.call('HGET', base .. 'passes', class) or '0')
    redis.call('ZADD', base .. class, math.max(last, now), tenant)
  end
  return added
end

-- A tenant whose line emptied leaves its class, keeping its pass for when it comes back.
local function line_idle(base, class, tenant, pass)
  redis.call('ZREM', base .. class, tenant)
  redis.call('HSET', base .. 'passes', class .. ':' .. tenant, pass)
end

-- Take a job out of the line its '_line' field names (it finished, or was picked).
local function line_leave(job_key, job_id)
  local where = line_field(job_key, '_line', nil)
  if not where then return 0 end
  redis.call('HSET', job_key, '_line', 'null')
  local base = where[1]
  local line = base .. where[2] .. ':' .. where[3]
  local removed = redis.call('ZREM', line, job_id)
  if removed == 1 then redis.call('DECR', base .. 'count') end
  if redis.call('ZCARD', line) == 0 then
    local pass = redis.call('ZSCORE', base .. where[2], where[3])
    if pass then line_idle(base, where[2], where[3], pass) end
  end
  return removed
end
