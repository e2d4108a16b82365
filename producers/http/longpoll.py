"""Long polls of job records (``GET /v1/jobs/{id}?wait=N``) that hold no thread.

One subscription per app process (:class:`FinishedWatch`, on ``redis.asyncio``) to the
channel where every finish is published (:func:`worker.keys.finished_channel`) hands each
message to the requests waiting for that job; the record is read once for all of them.
A waiter registers before it reads, so no finish is missed, and reads again while the
subscription is down. Another tenant's job is answered as unknown at the first read, with
no wait (:func:`visible`). The design: docs/design.md, "Job records" (the finished
channel); tenants: docs/tenants.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio
from starlette.concurrency import run_in_threadpool

from worker import keys
from worker.app import services
from worker.models import JobRecord
from worker.store.connection import connect_async

logger = logging.getLogger("producers.http.longpoll")

#: Longest wait a request may ask for.
MAX_WAIT_S = 60.0
#: A waiter reads the record again after this long, even when the subscription is up.
RECHECK_LIVE_S = 10.0
#: The same while the subscription is down.
RECHECK_DOWN_S = 1.0
#: Time allowed to a read of the subscription; a quiet channel just reads again.
LISTEN_TIMEOUT_S = 1.0
#: The subscription's connection pings Redis this often (a dead peer is noticed).
HEALTH_CHECK_S = 10
RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 5.0
CONNECT_TIMEOUT_S = 2.0


Reader = Callable[[str], Awaitable[JobRecord | None]]


async def read_record(job_id: str) -> JobRecord | None:
    """The job's record, read in the thread pool (the job store is synchronous)."""
    return await run_in_threadpool(services().store.get, job_id)


def visible(record: JobRecord | None, tenant: str) -> JobRecord | None:
    """The record if it is ``tenant``'s job, else None: to a caller, another tenant's job
    is exactly an unknown one."""
    return record if record is not None and record.tenant == tenant else None


@dataclass(eq=False)
class Waiter:
    """One waiting request: woken by ``event``, handed the finished ``record`` if read."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    record: JobRecord | None = None


class FinishedWatch:
    """One subscription to the finished channel, fanned out to per-job waiters.

    Parameters:
        url: the Redis holding the job records (where the channel is published).
        read: reads a job's record (once per finished job that has waiters).
    """

    def __init__(self, url: str, read: Reader = read_record) -> None:
        self._url = url
        self.read = read
        self._waiters: dict[str, set[Waiter]] = defaultdict(set)
        self._live = False
        self._down_reported = False
        self._task: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()

    @property
    def live(self) -> bool:
        """Whether the subscription is confirmed: a message published now will arrive."""
        return self._live

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="finished-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        for pending in [task, *self._deliveries]:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending

    @contextlib.contextmanager
    def watching(self, job_id: str) -> Iterator[Waiter]:
        """A waiter woken whenever ``job_id`` may have finished (or messages were lost)."""
        waiter = Waiter()
        self._waiters[job_id].add(waiter)
        try:
            yield waiter
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[job_id]

    def waiting(self) -> int:
        """How many requests wait now."""
        return sum(len(waiters) for waiters in self._waiters.values())

    async def _run(self) -> None:
        delay = RECONNECT_MIN_S
        while True:
            was_live = False
            try:
                await self._listen()
            except (redis.RedisError, OSError) as exc:
                was_live = self._live
                if not self._down_reported:
                    logger.warning("finished-channel subscription down (%s); retrying", exc)
                    self._down_reported = True
            finally:
                self._live = False
                self._wake_all()  # waiters read the record again, then every RECHECK_DOWN_S
            delay = RECONNECT_MIN_S if was_live else min(delay * 2, RECONNECT_MAX_S)
            await asyncio.sleep(delay)

    async def _listen(self) -> None:
        client = connect_async(
            self._url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            health_check_interval=HEALTH_CHECK_S,
        )
        try:
            async with client.pubsub() as pubsub:
                database = int(client.connection_pool.connection_kwargs.get("db") or 0)
                await pubsub.subscribe(keys.finished_channel(database))
                while True:
                    message = await pubsub.get_message(timeout=LISTEN_TIMEOUT_S)
                    if message is not None:
                        self._handle(message)
        finally:
            await client.aclose()

    def _handle(self, message: dict[str, Any]) -> None:
        if message["type"] == "subscribe":
            self._live = True
            self._down_reported = False
            self._wake_all()  # anything published while we were away is lost: read again
        elif message["type"] == "message":
            data = message["data"]
            job_id = data.decode() if isinstance(data, bytes) else str(data)
            if job_id in self._waiters:
                task = asyncio.create_task(self._deliver(job_id))
                self._deliveries.add(task)
                task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, job_id: str) -> None:
        """Read the finished record once and hand it to every waiter of the job."""
        try:
            record = await self.read(job_id)
        except (redis.RedisError, OSError):
            record = None  # the waiters read it themselves (and answer 503 if Redis is away)
        for waiter in self._waiters.get(job_id, ()):
            if record is not None and record.finished:
                waiter.record = record
            waiter.event.set()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.event.set()


async def wait_for_record(
    watch: FinishedWatch, job_id: str, wait_s: float, tenant: str
) -> JobRecord | None:
    """``tenant``'s job's record once it has finished, or after ``wait_s`` seconds; None at
    once if there is no such job of ``tenant``.

    A Redis error on the first read answers the caller; one while waiting is waited out
    (the record is read again soon), unless it is still there at the deadline.
    """
    deadline = time.monotonic() + wait_s
    last: JobRecord | None = None
    first = True
    with watch.watching(job_id) as waiter:
        while True:
            waiter.event.clear()
            live = watch.live  # before the read: a later message must reach the waiter
            try:
                record = visible(await watch.read(job_id), tenant)
            except redis.RedisError:
                if first or time.monotonic() >= deadline:
                    raise
                live = False
            else:
                if record is None or record.finished:
                    return record
                last = record
            first = False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return last
            recheck = RECHECK_LIVE_S if live else RECHECK_DOWN_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.event.wait(), min(remaining, recheck))
            if waiter.record is not None:
                return visible(waiter.record, tenant)
