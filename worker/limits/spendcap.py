"""A fleet-wide cap on what one API key spends: accepted createTasks per window.

``REMIX_SPEND_CAP`` (``500/1d,60/1h``) is a sliding log of spend reservations in the
broker's Redis, like the rate budget's (``reserve_spend.lua``, with several windows). A
reservation is made before the send and kept when it was accepted or its outcome is
unknown; only a definite refusal gives it back (:meth:`SpendCap.refund`). Why a log apart
from the rate budget's: docs/design.md, "The fleet's shared state".
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import redis

from worker import keys
from worker.lua import load_script
from worker.store.clock import server_time

#: Sends may run this late after their reserved moment (a busy worker); the windows are
#: widened by as much so that late sends still fit them.
LATENESS_TOLERANCE_S = 0.25
#: A send may be this early (timer granularity) and still count as on time.
EARLINESS_TOLERANCE_S = 0.02


@dataclass(frozen=True)
class Reservation:
    """The answer to a request for a spend moment.

    ``reserved`` False means no moment within ``max_ahead`` was free; the next free one
    is ``delay`` seconds away.
    """

    reserved: bool
    delay: float
    at: float


@dataclass(frozen=True)
class WindowSpend:
    """What one window of the cap holds now: spent (or reserved) in it, and reserved ahead."""

    limit: int
    window: float
    spent: int
    reserved_ahead: int


class SpendCap:
    """The spend cap of one API key: ``caps`` is ``[(limit, window_seconds), ...]``.

    With no caps, every method is a no-op that allows everything (``enabled`` is False).
    """

    def __init__(self, client: redis.Redis, api_key_id: str, caps: list[tuple[int, float]]):
        self.redis = client
        self.caps = list(caps)
        self._log_key = keys.spend_log(api_key_id)
        self._reserve = load_script(client, "reserve_spend")

    @property
    def enabled(self) -> bool:
        return bool(self.caps)

    @property
    def windows(self) -> list[tuple[int, float]]:
        """The caps as the log counts them: each window widened for late sends."""
        return [(limit, window + LATENESS_TOLERANCE_S) for limit, window in self.caps]

    def reserve(self, max_ahead: float, replacing: str | None = None) -> tuple[str, Reservation]:
        """Reserve the earliest moment the cap allows, if at most ``max_ahead`` s away.

        ``replacing``: a reservation of the same job whose moment passed unused; it is
        dropped in the same step. Returns the new reservation's member and the answer
        (the member is in the log only when ``reserved``).
        """
        member = uuid.uuid4().hex
        pairs = [str(v) for limit, window in self.windows for v in (limit, window)]
        reserved, delay, at = self._reserve(
            keys=[self._log_key],
            args=[max_ahead, member, replacing or "", len(self.caps), *pairs],
        )
        return member, Reservation(reserved == b"1", max(0.0, float(delay)), float(at))

    def refund(self, member: str) -> bool:
        """Give back a reservation whose createTask was definitely not accepted."""
        return bool(self.redis.zrem(self._log_key, member))

    def now(self) -> float:
        """Redis's clock, which every reservation is measured against."""
        return server_time(self.redis)

    def usage(self) -> list[WindowSpend]:
        """Per window: reservations in the window up to now, and reserved ahead."""
        now = self.now()
        with self.redis.pipeline(transaction=False) as pipe:
            for _, window in self.caps:
                pipe.zcount(self._log_key, now - window, now)
            pipe.zcount(self._log_key, f"({now}", "+inf")
            counts = [int(c) for c in pipe.execute()]
        ahead = counts.pop()
        return [
            WindowSpend(limit, window, spent, ahead)
            for (limit, window), spent in zip(self.caps, counts, strict=True)
        ]
