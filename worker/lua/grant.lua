-- Grant send moments of one API key to jobs waiting in its lines: as many as every window
-- of its budget allows now, counting the moments granted and not yet used (a grant is
-- used by consume.lua, which logs the moment the request is really sent). None while the
-- key is paused or blocked after an upstream 429, or while its spend cap is reached. When
-- more jobs wait than can go now (less a few moments kept free, ARGV[8]), the moments are
-- paced, one every window / limit, so that a job arriving later waits for the next moment,
-- not for the next window.
--
-- KEYS[1]  the key's log of sends (sorted set: member -> when it was sent)
-- KEYS[2]  the moments granted and not yet used (sorted set: member -> when it expires)
-- KEYS[3]  the moment until which the key is blocked (string), if any
-- KEYS[4]  when the next paced moment comes (string)
-- KEYS[5]  the key's pause (hash), if any
-- KEYS[6]  the key's spend log (sorted set: member -> moment), read when ARGV[8] > 0
-- ARGV[1]  sends allowed per window
-- ARGV[2]  the window in seconds, widened by the upstream's tolerance
-- ARGV[3]  seconds between two paced moments
-- ARGV[4]  jobs waiting for the key
-- ARGV[5]  most moments to grant
-- ARGV[6]  seconds a grant stays usable
-- ARGV[7]  prefix of the new grants' members (unique per call)
-- ARGV[8]  moments a burst leaves free (a job of a higher class arriving next finds one)
-- ARGV[9]  the number N of spend cap windows; ARGV[10..9+2N]: spends allowed, window in s
-- Returns {seconds until another moment may be granted, member, member, ...} as strings.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local limit, window, period = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local waiting, most, valid = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local RECHECK_S = 1.0
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('EXISTS', KEYS[5]) == 1 then return {tostring(RECHECK_S)} end
local blocked = tonumber(redis.call('GET', KEYS[3]) or '0')
if blocked > now then return {tostring(blocked - now)} end
local sent, pending = redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])
local free = limit - sent - pending
local capped = false
local kept = tonumber(ARGV[8])
for i = 0, tonumber(ARGV[9]) - 1 do
  local allowed, span = tonumber(ARGV[10 + 2 * i]), tonumber(ARGV[11 + 2 * i])
  local spent = redis.call('ZCOUNT', KEYS[6], now - span, '+inf')
  if allowed - spent - pending < free then
    free = allowed - spent - pending
    capped = true
  end
end
-- When the next moment frees up: the oldest send in the window leaves it (or sooner, if a
-- grant is given back or expires; the caller asks again by then at the latest).
local function next_free()
  if capped then return RECHECK_S end
  local over = sent - (limit - pending)
  if over < 0 then return 0 end
  local nth = redis.call('ZRANGE', KEYS[1], over, over, 'WITHSCORES')
  if not nth[2] then return math.min(RECHECK_S, valid) end
  return math.max(0, tonumber(nth[2]) + window - now)
end
if free <= 0 or waiting <= 0 then return {tostring(next_free())} end
-- The next paced moment: never more than a window ahead (a pace set under a slower limit
-- does not hold a faster one back) and at most one period's credit behind.
local pace = tonumber(redis.call('GET', KEYS[4]) or '0')
pace = math.max(math.min(pace, now + limit * period), now - period)
local count = math.min(most, waiting, free)
local paced = waiting > free - kept
if paced then
  -- A backlog: one moment per period (and one period's worth of credit at most). A burst
  -- leaves the pace alone, so the moments it kept free go to the next jobs at once.
  local due = 0
  while due < count and pace + due * period <= now do due = due + 1 end
  count = due
end
local out = {''}
for i = 1, count do
  local member = ARGV[7] .. ':' .. i
  redis.call('ZADD', KEYS[2], now + valid, member)
  table.insert(out, member)
end
if paced then pace = pace + count * period end
redis.call('SET', KEYS[4], string.format('%.6f', pace), 'EX', math.ceil(window + 1))
redis.call('EXPIRE', KEYS[2], math.ceil(valid + 1))
sent, pending, free = sent, pending + count, free - count
if free > 0 and waiting > count then
  out[1] = tostring(math.max(0, pace - now, 0.001))
else
  out[1] = tostring(next_free())
end
return out
