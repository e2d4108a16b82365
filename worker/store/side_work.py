"""What the side-work schedules (completion webhooks, archiving) share.

See docs/architecture.md.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import redis

from worker.store.jobs import JobStore

#: First pause of a webhook held back by its receiver's limit; it doubles each time, up
#: to the delivery timeout (a delivery in flight ends within it).
HOLD_FIRST_S = 0.25
#: The fleet-wide limit when the fleet's size is unknown (a claim made outside a worker).
UNLIMITED = 1_000_000


class HasJobStore(Protocol):
    """What a side-work schedule is found by: the job store it lives beside."""

    store: JobStore


def most_in_fleet(fleet_slots: int | None) -> int:
    """Deliveries and archive steps allowed in flight at once, together: half the fleet's
    slots, at least one."""
    return UNLIMITED if fleet_slots is None else max(1, fleet_slots // 2)


T = TypeVar("T")


class PerClient(Generic[T]):
    """One ``T`` per Redis client, built on first use: a store that registers its Lua
    scripts is built once per client, not once per step."""

    #: Clients remembered at most (tests build many); past it the cache starts again.
    MOST_CACHED = 16

    def __init__(self, factory: Callable[[redis.Redis], T]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._built: dict[int, tuple[redis.Redis, T]] = {}

    def get(self, client: redis.Redis) -> T:
        found = self._built.get(id(client))
        if found is not None and found[0] is client:
            return found[1]
        with self._lock:
            if len(self._built) >= self.MOST_CACHED:
                self._built.clear()
            built = self._factory(client)
            self._built[id(client)] = (client, built)
            return built
