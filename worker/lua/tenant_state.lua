-- Not a script: a function that the scripts moving a job from one state to another include
-- (accept.lua, update.lua and cancel.lua: a line `-- #include tenant_state.lua`, replaced by
-- this text when the script is loaded). A record written by create.lua holds
-- '_tenant_index' (the start of the names of its tenant's state indexes: the state follows)
-- and, while it is queued, '_waiting' (its field in the waiting counts, which it leaves
-- with its first move out of queued). Records written before tenants existed hold neither.
-- KEYS and ARGV: none of its own; the caller passes the waiting counts' key.

-- Move a job from its tenant's index of from_state to that of to_state (state names:
-- 'queued', 'submitted' ...), scored by its creation time; a job that leaves 'queued'
-- no longer counts as waiting.
local function tenant_moved(job_key, job_id, from_state, to_state, created, waiting_key)
  local prefix = redis.call('HGET', job_key, '_tenant_index')
  if prefix then
    prefix = cjson.decode(prefix)
    redis.call('ZREM', prefix .. from_state, job_id)
    redis.call('ZADD', prefix .. to_state, created, job_id)
  end
  local waiting = redis.call('HGET', job_key, '_waiting')
  if from_state == 'queued' and waiting then
    waiting = cjson.decode(waiting)
    if redis.call('HINCRBY', waiting_key, waiting, -1) <= 0 then
      redis.call('HDEL', waiting_key, waiting)
    end
    redis.call('HDEL', job_key, '_waiting')
  end
end
