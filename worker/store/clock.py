"""One clock for the whole fleet: the clock of the Redis server that holds the job records.

Hosts' clocks drift apart and may be stepped; the job records, the schedule and the
deadlines must not. The Lua scripts read Redis's ``TIME`` directly; Python code asks a
:class:`RedisClock`, which measures the server's time against the host's *monotonic*
clock every :data:`RESYNC_S` seconds and adds the monotonic time elapsed since (no round
trip per reading; a step of the host's wall clock changes nothing). The error is at most
half a round trip plus the drift of the monotonic clock since the last measurement.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import redis

#: How often the offset to the server's clock is measured again.
RESYNC_S = 30.0


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch on the fleet's clock."""
        ...


class RedisClock:
    """The Redis server's clock, read cheaply.

    Parameters:
        client: the Redis server whose ``TIME`` is the fleet's clock.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._offset = 0.0
        self._synced_at = -RESYNC_S
        self._lock = threading.Lock()

    def now(self) -> float:
        local = time.monotonic()
        if local - self._synced_at >= RESYNC_S:
            self._sync()
        return time.monotonic() + self._offset

    def last_known(self) -> float | None:
        """The reading from the last measurement, without asking Redis (None before the
        first): for callers that must not wait for a Redis that may be away."""
        with self._lock:
            if self._synced_at == -RESYNC_S:
                return None
            return time.monotonic() + self._offset

    def _sync(self) -> None:
        before = time.monotonic()
        seconds, micros = self._client.time()
        after = time.monotonic()
        with self._lock:
            self._offset = seconds + micros / 1e6 - (before + after) / 2
            self._synced_at = after


def server_time(client: redis.Redis) -> float:
    """One reading of a Redis server's clock (a round trip)."""
    seconds, micros = client.time()
    return seconds + micros / 1e6
