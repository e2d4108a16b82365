"""One createTask budget per API key, shared by every worker on every host.

A sliding log of *reservations* in Redis (``reserve.lua``): a submit is given the earliest
moment that keeps every window within the limit and is parked until then, so each waiting
job has its own moment instead of all asking again. An upstream 429 may block the key for
a while (:meth:`SharedRateLimiter.block`, capped; an operator's resume clears it). Why
reservations, and the 429 hold: docs/design.md, "The fleet's shared state".
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import redis

from worker import keys
from worker.lua import load_script
from worker.store.clock import server_time

#: Sends may run this late after their reserved moment (a busy worker); the window is
#: widened by as much so that late sends still fit the upstream's window.
LATENESS_TOLERANCE_S = 0.25
#: A send may be this early (timer granularity) and still count as on time.
EARLINESS_TOLERANCE_S = 0.02
#: No hold after a 429 is longer than this.
MAX_BLOCK_S = 300.0


@dataclass(frozen=True)
class Reservation:
    """The answer to a request for budget.

    ``reserved`` False means no moment within ``max_ahead`` was free; the next free one
    is ``delay`` seconds away.
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
        api_key_id: a non-secret identifier of the API key.
        limit, window: the budget, e.g. 20 per 10 s.
    """

    def __init__(self, client: redis.Redis, api_key_id: str, limit: int, window: float) -> None:
        self.redis = client
        self.limit = limit
        self.window = window
        self._log_key = keys.rate_log(api_key_id)
        self._blocked_key = keys.rate_blocked(api_key_id)
        self._reserve = load_script(client, "reserve")
        self._block = load_script(client, "block")
        self._usage = load_script(client, "usage")

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
        return server_time(self.redis)

    def block(self, seconds: float) -> None:
        """Hold every reservation for ``seconds`` (at most :data:`MAX_BLOCK_S`)."""
        self._block(keys=[self._blocked_key], args=[min(MAX_BLOCK_S, max(0.0, seconds))])

    def blocked_until(self) -> float:
        """The moment (Redis clock) until which every send holds; 0 when none."""
        raw = self.redis.get(self._blocked_key)
        return float(raw) if raw else 0.0

    def clear_block(self) -> bool:
        """End a hold after a 429 (an operator's resume); True when there was one."""
        return bool(self.redis.delete(self._blocked_key))

    def forget_reservations_ahead(self) -> int:
        """Drop the moments reserved in the future (their jobs are woken to reserve again)."""
        return int(self.redis.zremrangebyscore(self._log_key, f"({self.now()}", "+inf"))

    def usage(self) -> Usage:
        """Requests sent in the current window, reserved ahead, and any block."""
        used, ahead, blocked, now = self._usage(
            keys=[self._log_key, self._blocked_key], args=[self.window]
        )
        return Usage(int(used), int(ahead), max(0.0, float(blocked) - float(now)))
