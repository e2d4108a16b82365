"""What the side-work schedules (completion webhooks, archiving) share.

See docs/architecture.md.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import redis

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
