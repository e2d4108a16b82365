-- Not a script: functions that claim_notify.lua and claim_archive.lua include (a line
-- `-- #include side_work.lua`, replaced by this text when the script is loaded). Webhook
-- deliveries and archive steps are "side work": together they hold at most half of the
-- fleet's worker slots, and an entry over that limit waits in its schedule.
-- KEYS and ARGV: none of its own; claim_side_work reads its caller's first three KEYS and
-- first seven ARGV, which claim_notify.lua and claim_archive.lua share.

-- A JSON field's value, or nil when the field is missing or not JSON.
local function decoded(raw)
  if not raw then return nil end
  local ok, value = pcall(cjson.decode, raw)
  if ok then return value end
  return nil
end

-- Side work in flight: this kind's set (expired leases already pruned) plus the other
-- kind's leases that have not ended.
local function side_work_in_flight(own, other, now)
  return redis.call('ZCARD', own) + redis.call('ZCOUNT', other, '(' .. now, '+inf')
end

-- Hold an entry back: due again after a pause that doubles with each hold, up to `most`.
local function hold_back(schedule, key, prefix, id, now, first, most)
  local holds = redis.call('HINCRBY', key, prefix .. '_holds', 1)
  redis.call('ZADD', schedule, now + math.min(most, first * 2 ^ math.min(holds - 1, 30)), id)
end

-- Hand an entry out: a new token, sent now, due again (and in flight) until its lease ends.
local function hand_out(schedule, in_flight, key, prefix, id, now, lease)
  local token = redis.call('HINCRBY', key, prefix .. '_token', 1)
  redis.call('HSET', key, prefix .. '_sent_at', string.format('%.6f', now), prefix .. '_holds', '0')
  redis.call('ZADD', schedule, now + lease, id)
  redis.call('ZADD', in_flight, now + lease, id)
  return token
end

-- Hand out the due entries of a side-work schedule: the body of claim_notify.lua and
-- claim_archive.lua, whose KEYS[1..3] and ARGV[1..7] mean the same (see their headers).
-- Returns the flat list of the answers. What differs between the two comes in `kind`:
--   prefix                   prefix of the kind's job fields ('_notify', '_archive')
--   read(key)                nil when the entry is no longer pending (it leaves the
--                            schedule), else a table with its `lease` and `sent_at` (nil:
--                            never sent)
--   held(id, entry)          true when a limit of the kind's own holds the entry back
--   handed(out, id, entry, token, lost, score)   records the hand-out, appends its answer
-- An entry whose latest message may still be waiting in the queue (the queue's oldest
-- waiting message was sent no later than it) keeps its message: its lease is renewed.
local function claim_side_work(now, kind)
  local schedule, in_flight, other = KEYS[1], KEYS[2], KEYS[3]
  local head, margin = tonumber(ARGV[3]), tonumber(ARGV[4])
  local most_in_fleet = tonumber(ARGV[5])
  local hold_first, hold_max = tonumber(ARGV[6]), tonumber(ARGV[7])
  local due = redis.call('ZRANGEBYSCORE', schedule, '-inf', now, 'WITHSCORES', 'LIMIT', 0,
    tonumber(ARGV[2]))
  local out = {}
  if #due > 0 then redis.call('ZREMRANGEBYSCORE', in_flight, '-inf', now) end
  for i = 1, #due, 2 do
    local id, score = due[i], due[i + 1]
    local key = ARGV[1] .. id
    local entry = kind.read(key)
    if not entry then
      redis.call('ZREM', schedule, id)
    elseif entry.sent_at and head and head <= entry.sent_at + margin then
      redis.call('ZADD', schedule, now + entry.lease, id)
    else
      redis.call('ZREM', in_flight, id)  -- its own earlier message or step, if any, was lost
      if kind.held(id, entry) or side_work_in_flight(in_flight, other, now) >= most_in_fleet then
        hold_back(schedule, key, kind.prefix, id, now, hold_first, hold_max)
      else
        local token = hand_out(schedule, in_flight, key, kind.prefix, id, now, entry.lease)
        local lost = '0'
        if entry.sent_at then lost = '1' end
        kind.handed(out, id, entry, token, lost, score)
      end
    end
  end
  return out
end
