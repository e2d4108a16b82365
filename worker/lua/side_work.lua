-- Not a script: functions that claim_notify.lua and claim_archive.lua include (a line
-- `-- #include side_work.lua`, replaced by this text when the script is loaded). Webhook
-- deliveries and archive steps are "side work": together they hold at most half of the
-- fleet's worker slots, and an entry over that limit waits in its schedule.
-- KEYS and ARGV: none of its own; every key and value comes from its caller.

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
