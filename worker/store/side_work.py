"""What the side-work schedules (completion webhooks, archiving) share.

:class:`SideSchedule` is the part of :class:`~worker.store.notify.NotifyStore` and
:class:`~worker.store.archive.ArchiveSchedule` that is the same: the claim (whose Lua body
is ``claim_side_work`` in ``lua/side_work.lua``), reading a target, recording an outcome.
Both kinds together hold at most half of the fleet's slots (:func:`most_in_fleet`).
See docs/architecture.md and docs/design.md, "Completion webhooks".
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import redis

from worker import keys
from worker.lua import load_script
from worker.models import JobRecord
from worker.settings import Settings
from worker.store.jobs import SEND_MARGIN_S, JobStore, decode_text, read_record

#: First pause of an entry held back by a limit; it doubles each time, up to the kind's
#: longest (for a webhook, the delivery timeout: a delivery in flight ends within it).
HOLD_FIRST_S = 0.25
#: The fleet-wide limit when the fleet's size is unknown (a claim made outside a worker).
UNLIMITED = 1_000_000

T = TypeVar("T")
D = TypeVar("D")


class HasJobStore(Protocol):
    """What a side-work schedule is found by: the job store it lives beside."""

    store: JobStore


def most_in_fleet(fleet_slots: int | None) -> int:
    """Deliveries and archive steps allowed in flight at once, together: half the fleet's
    slots, at least one."""
    return UNLIMITED if fleet_slots is None else max(1, fleet_slots // 2)


class SideSchedule(Generic[D]):
    """What a side-work schedule (webhooks, archiving) is made of: a sorted set of job ids
    scored by when their next try is due, a set of those in flight, a token field on the
    job, a claim script and an end script. Subclasses name them, build their own arguments
    and read what a claim hands out (a ``D``).

    Parameters:
        client: a redis-py client for the result backend's database (job records).
    """

    #: The schedule; this kind's in-flight set; the other kind's (the fleet-wide limit).
    SCHEDULE: ClassVar[str]
    IN_FLIGHT: ClassVar[str]
    OTHER_IN_FLIGHT: ClassVar[str]
    #: The job field holding the latest token: only the message carrying it may act.
    TOKEN_FIELD: ClassVar[str]
    #: The Lua scripts that hand entries out and record outcomes; values per handed entry.
    CLAIM_SCRIPT: ClassVar[str]
    END_SCRIPT: ClassVar[str]
    CLAIM_WIDTH: ClassVar[int]

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._claim = load_script(client, self.CLAIM_SCRIPT)
        self._end = load_script(client, self.END_SCRIPT)

    def claim(
        self,
        limit: int,
        settings: Settings,
        *,
        oldest_waiting: float | None = None,
        fleet_slots: int | None = None,
    ) -> list[D]:
        """Up to ``limit`` due entries, each with a new token and a lease.

        ``oldest_waiting``: send time of the kind's queue's oldest waiting message (None
        when it is empty); ``fleet_slots``: the fleet's worker slots, of which webhooks and
        archive steps together hold at most half (None: no fleet-wide limit). See
        ``claim_side_work`` in ``side_work.lua`` for the arguments both kinds share.
        """
        hold_max, own = self._claim_args(settings)
        args = [
            keys.JOB_PREFIX,
            limit,
            "" if oldest_waiting is None else repr(oldest_waiting),
            SEND_MARGIN_S,
            most_in_fleet(fleet_slots),
            HOLD_FIRST_S,
            hold_max,
            *own,
        ]
        flat = self._claim(keys=[self.SCHEDULE, self.IN_FLIGHT, self.OTHER_IN_FLIGHT], args=args)
        width = self.CLAIM_WIDTH
        return [self._dispatch(flat[i : i + width]) for i in range(0, len(flat), width)]

    def _claim_args(self, settings: Settings) -> tuple[float, list[Any]]:
        """The longest pause of an entry held back by a limit, and the arguments of the
        kind's own claim script that follow the shared ones."""
        raise NotImplementedError

    def _dispatch(self, values: list[Any]) -> D:
        """One entry of the claim script's answer (:data:`CLAIM_WIDTH` values)."""
        raise NotImplementedError

    def _read(self, job_id: str) -> tuple[JobRecord, dict[str, Any], int] | None:
        """The job's public record, every field and the current token (None: no such job)."""
        found = read_record(self.redis, job_id)
        if found is None:
            return None
        record, fields = found
        return record, fields, int(fields.get(self.TOKEN_FIELD) or 0)

    def _ended(self, job_keys: list[str], args: list[Any]) -> str:
        """Run the end script; its answer."""
        return decode_text(self._end(keys=job_keys, args=args))

    def due(self, job_id: str) -> float | None:
        """When the job's next try is due (None when none is scheduled)."""
        score = self.redis.zscore(self.SCHEDULE, job_id)
        return None if score is None else float(score)

    def size(self) -> int:
        """Entries that have not ended yet."""
        return int(self.redis.zcard(self.SCHEDULE))


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
