"""One createTask budget per API key, shared by every worker on every host.

The budget is a sliding log of *reservations* in Redis: a submit asks for the
earliest moment at which sending keeps every window of ``window`` seconds at
no more than ``limit`` requests, and is given that moment (or told to come
back later when it is further ahead than a countdown may be). The submit then
waits with a countdown of exactly that length, holding no worker slot, and
sends at its reserved moment.

Why not the ``limits`` library: it answers "is there budget now?", which would
make every waiting submit wake up and ask again until it wins (a thundering
herd of retries); reservations give each waiting job its own moment. Redis's
own clock (``TIME``) is used so that hosts with skewed clocks agree.

An upstream 429 despite the budget (another client on the same key, say) sets
a shared "blocked until" moment that every reservation respects.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import redis

from worker.jobstore import KEY_PREFIX

#: Sends may run this late after their reserved moment (a busy worker); the
#: window is widened by as much so that late sends still fit the upstream's window.
LATENESS_TOLERANCE_S = 0.25
#: A send may be this early (timer granularity) and still count as on time.
EARLINESS_TOLERANCE_S = 0.02


def _limiter_key(api_key_id: str, name: str) -> str:
    return f"{KEY_PREFIX}ratelimit:{api_key_id}:{name}"


# KEYS: log, blocked_until. ARGV: limit, window, max_ahead, member.
# -> {reserved (1|0), delay seconds, reserved moment} as strings (Lua numbers
# would be truncated to integers on the way back).
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local limit, window, ahead = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local at = now
local blocked = tonumber(redis.call('GET', KEYS[2]) or '0')
if blocked > at then at = blocked end
local count = redis.call('ZCARD', KEYS[1])
if count >= limit then
  local nth = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
  local free = tonumber(nth[2]) + window
  if free > at then at = free end
end
if at - now > ahead then
  return {'0', tostring(at - now), tostring(at)}
end
redis.call('ZADD', KEYS[1], at, ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(window + ahead + 1))
return {'1', tostring(at - now), tostring(at)}
"""

# KEYS: blocked_until. ARGV: seconds -> pushes the moment out, never in.
_BLOCK = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ > current then
  redis.call('SET', KEYS[1], tostring(until_), 'EX', math.ceil(tonumber(ARGV[1])) + 1)
end
return tostring(math.max(until_, current))
"""

# KEYS: log, blocked_until. ARGV: window -> {sent in the last window, blocked until}.
_USAGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local used = redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[1]), now)
local ahead = redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
return {tostring(used), tostring(ahead), redis.call('GET', KEYS[2]) or '0', tostring(now)}
"""


@dataclass(frozen=True)
class Reservation:
    """The answer to a request for budget.

    ``reserved`` False means no moment within ``max_ahead`` was free: ask again
    after ``delay`` (capped by the caller).
    """

    reserved: bool
    delay: float
    at: float


@dataclass(frozen=True)
class Usage:
    used_in_window: int
    reserved_ahead: int
    blocked_for: float


class SharedRateLimiter:
    """A fleet-wide budget of ``limit`` requests per ``window`` seconds.

    Parameters:
        client: Redis shared by every worker (the broker's).
        api_key_id: a non-secret identifier of the API key (see ``key_fingerprint``).
        limit, window: the budget, e.g. 20 per 10 s.
    """

    def __init__(self, client: redis.Redis, api_key_id: str, limit: int, window: float) -> None:
        self.redis = client
        self.limit = limit
        self.window = window
        self._log_key = _limiter_key(api_key_id, "log")
        self._blocked_key = _limiter_key(api_key_id, "blocked")
        self._reserve = client.register_script(_RESERVE)
        self._block = client.register_script(_BLOCK)
        self._usage = client.register_script(_USAGE)

    @property
    def effective_window(self) -> float:
        return self.window + LATENESS_TOLERANCE_S

    def reserve(self, max_ahead: float) -> Reservation:
        """Reserve the earliest free moment, if it is at most ``max_ahead`` seconds away."""
        reserved, delay, at = self._reserve(
            keys=[self._log_key, self._blocked_key],
            args=[self.limit, self.effective_window, max_ahead, uuid.uuid4().hex],
        )
        return Reservation(reserved == b"1", max(0.0, float(delay)), float(at))

    def now(self) -> float:
        """Redis's clock, which every reservation is measured against."""
        seconds, micros = self.redis.time()
        return seconds + micros / 1e6

    def block(self, seconds: float) -> None:
        """Hold every reservation for ``seconds`` (after an upstream 429)."""
        self._block(keys=[self._blocked_key], args=[max(0.0, seconds)])

    def usage(self) -> Usage:
        """Requests sent in the current window, reserved ahead, and any block."""
        used, ahead, blocked, now = self._usage(
            keys=[self._log_key, self._blocked_key], args=[self.window]
        )
        return Usage(int(used), int(ahead), max(0.0, float(blocked) - float(now)))
