-- Create queued jobs, each with its request and its place in its waiting line (lines.lua),
-- unless its idempotency key already names a job (or its id is taken): all the new ones,
-- or none when a tenant would have more jobs waiting to be sent than it may. A job's place
-- in the schedule is only a backstop, at its submit deadline. Record values are JSON text.
--
-- KEYS[1]  the schedule (sorted set: job id -> when its next step is due)
-- KEYS[2]  the index of queued jobs (sorted set: job id -> creation time)
-- KEYS[3]  the waiting counts (hash: '<tenant>:<priority>' -> its queued jobs)
-- KEYS[4]  the set of tenants
-- KEYS[5..] for each job in turn: its hash, its tenant's index of queued jobs, then its
--          idempotency key if it has one (its ARGV says)
-- ARGV[1]  time to live of the records and the idempotency keys, in seconds
-- ARGV[2]  seconds until the schedule hands the jobs out (their submit deadline, a margin)
-- ARGV[3]  the most jobs one tenant may have waiting, '' for no limit
-- ARGV[4]  the priorities, separated by spaces (a tenant's waiting jobs are summed over them)
-- ARGV[5]  prefix of the waiting lines' keys
-- ARGV[6..] for each job, five values: its id, tenant, priority, '1' when it has an
--          idempotency key (else ''), and a JSON object of the new record's fields (name ->
--          JSON text of the value)
-- Returns {'ok', owner, created, owner, created, ...}, a pair per job: the job its
-- idempotency key names (its own id when it names none) and 1 if a record was written; or
-- {'full', tenant, waiting, adding} when a tenant's waiting jobs plus its new ones would be
-- more than ARGV[3]: then nothing is written. A new record's '_waiting' names its field in
-- the waiting counts (tenant_state.lua takes it out of them). The jobs' creation times are
-- a microsecond apart, in their order, so every index lists them as they were given.
-- #include lines.lua
local t = redis.call('TIME')
local micros = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[3])

-- Which jobs are new, and how many each tenant adds (nothing is written yet).
local jobs, claimed, seen, adding = {}, {}, {}, {}
local k = 5
for a = 6, #ARGV, 5 do
  local job = {id = ARGV[a], tenant = ARGV[a + 1], priority = ARGV[a + 2],
    fields = ARGV[a + 4], key = KEYS[k], index = KEYS[k + 1]}
  k = k + 2
  job.owner = job.id
  if ARGV[a + 3] == '1' then
    job.idem = KEYS[k]
    k = k + 1
    job.owner = claimed[job.idem] or redis.call('GET', job.idem) or job.id
    if job.owner == job.id then claimed[job.idem] = job.id end
  end
  job.new = job.owner == job.id and not seen[job.id] and redis.call('EXISTS', job.key) == 0
  seen[job.id] = true
  if job.new then adding[job.tenant] = (adding[job.tenant] or 0) + 1 end
  table.insert(jobs, job)
end

if limit then
  for tenant, count in pairs(adding) do
    local waiting = 0
    for priority in string.gmatch(ARGV[4], '%S+') do
      waiting = waiting + (tonumber(redis.call('HGET', KEYS[3], tenant .. ':' .. priority)) or 0)
    end
    if waiting + count > limit then return {'full', tenant, waiting, count} end
  end
end

local reply = {'ok'}
for _, job in ipairs(jobs) do
  if job.idem and claimed[job.idem] == job.id then
    redis.call('SET', job.idem, job.id, 'EX', ARGV[1])
  end
  if job.new then
    local created = string.format('%d.%06d', math.floor(micros / 1000000), micros % 1000000)
    local at = tonumber(created)
    micros = micros + 1
    for name, value in pairs(cjson.decode(job.fields)) do
      redis.call('HSET', job.key, name, value)
    end
    redis.call('HSET', job.key, 'created_at', created, '_dispatch', '0', '_parked', '0',
      '_dispatched_at', created)
    redis.call('EXPIRE', job.key, ARGV[1])
    redis.call('ZADD', KEYS[1], at + tonumber(ARGV[2]), job.id)
    redis.call('ZADD', KEYS[2], at, job.id)
    redis.call('ZADD', job.index, at, job.id)
    redis.call('SADD', KEYS[4], job.tenant)
    local waiting = job.tenant .. ':' .. job.priority
    redis.call('HSET', job.key, '_waiting', cjson.encode(waiting))
    redis.call('HINCRBY', KEYS[3], waiting, 1)
    line_join(ARGV[5], job.key, job.id)
  end
  table.insert(reply, job.owner)
  table.insert(reply, job.new and 1 or 0)
end
return reply
