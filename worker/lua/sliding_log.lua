-- Not a script: what reserve_spend.lua (the spend cap) includes (a line
-- `-- #include sliding_log.lua`, replaced by this text when the script is loaded): a
-- sliding log of reserved moments in a sorted set (member -> moment).
-- KEYS and ARGV: none of its own; every key and value comes from its caller.

-- The earliest moment, not before `at`, at which one more reservation keeps every window
-- within its limit. `windows`: a list of {limit, window in seconds}; `log` holds no moment
-- older than the longest window. At most limit - 1 reservations may lie after
-- (moment - window): the one limit-th from the end must be at least a window before it.
local function earliest_moment(log, at, windows)
  local size = redis.call('ZCARD', log)
  for _, each in ipairs(windows) do
    local limit, window = each[1], each[2]
    if size >= limit then
      local nth = redis.call('ZRANGE', log, size - limit, size - limit, 'WITHSCORES')
      local free = tonumber(nth[2]) + window
      if free > at then at = free end
    end
  end
  return at
end

-- Reserve moment `at` for `member`, unless it is more than `ahead` seconds after `now`; the
-- log lives as long as a reservation matters (`longest` window + `ahead` + 1 s).
-- Returns {'1' reserved or '0', delay in seconds, the moment} as strings (a Lua number
-- would be truncated to an integer on the way back).
local function reserve_moment(log, member, now, at, ahead, longest)
  if at - now > ahead then
    return {'0', tostring(at - now), tostring(at)}
  end
  redis.call('ZADD', log, at, member)
  redis.call('EXPIRE', log, math.ceil(longest + ahead + 1))
  return {'1', tostring(at - now), tostring(at)}
end
