"""The schedule's dispatcher: a thread in every worker that sends each job's next step when
it is due.

Each round gives the send moments of each key to the jobs waiting in its lines
(:mod:`worker.fleet.picker`) and claims the due jobs (``claim_due.lua``: a new dispatch
token and a lease each), and publishes ``remix.submit``, or one ``remix.poll`` for up to
:data:`POLL_BATCH_SIZE` jobs; then the due webhooks and archiving
(:mod:`worker.fleet.side_dispatch`), apart from the jobs. Its heartbeat says which slots,
queues and upstreams the worker has. After a broker outage it sends at once the jobs whose
messages were dropped (:meth:`Dispatcher.after_outage`).

Why jobs are parked and not sent with countdowns, the lease and the backlog rule:
docs/design.md, "The schedule and the dispatcher"; running a fleet: docs/operations.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import cast

import redis

from worker import keys
from worker.fleet.picker import Picker
from worker.fleet.side_dispatch import dispatch_archives, dispatch_notifications
from worker.models import PROVIDERS
from worker.services import Services
from worker.store.jobs import Dispatch
from worker.store.publisher import (
    ARCHIVE_QUEUE,
    NOTIFY_QUEUE,
    POLL_QUEUE,
    SENT_AT_HEADER,
    SUBMIT_QUEUE,
)
from worker.upstreams.providers import configured_providers

logger = logging.getLogger("worker.dispatcher")

#: At most this many jobs per ``remix.poll`` message.
POLL_BATCH_SIZE = 25
#: At most this many jobs claimed per round trip.
CLAIM_LIMIT = 500
#: Pause between two looks at the schedule when nothing was due.
TICK_S = 0.05
#: The shortest pause between two rounds when a send moment is about to come.
MIN_WAIT_S = 0.01
#: Pause after a failed round (Redis or the broker unreachable).
ERROR_PAUSE_S = 1.0
QUEUES = (SUBMIT_QUEUE, POLL_QUEUE, NOTIFY_QUEUE, ARCHIVE_QUEUE)
#: Seconds between two heartbeats of a worker process; one silent 3x this long is gone.
HEARTBEAT_S = 5.0
#: Heartbeats older than this are dropped from the list of workers.
HEARTBEAT_FORGET_S = 3600.0
#: Seconds between two prunings of the state indexes (one worker prunes, any one).
PRUNE_S = 600.0
#: A worker whose last heartbeat is older than this no longer counts its slots.
LIVE_WORKER_S = 3 * HEARTBEAT_S
#: Submit messages a slot of the fleet may have waiting for it (picks stop beyond).
PICKS_PER_SLOT = 10
#: How often jobs of a provider no worker of this one's can send are looked at.
ORPHAN_CHECK_S = 2.0
#: Weight of the newest reading in the estimate of how fast the fleet takes submits, and
#: the shortest time one reading spans (a burst between two close rounds is no rate).
DRAIN_SMOOTHING = 0.3
DRAIN_READING_S = 0.2
#: The estimate is forgotten when no reading told anything for this long (an empty queue
#: tells nothing: a hold or a pause may have stopped the picks meanwhile).
DRAIN_FORGET_S = 2.0
#: A fleet that takes its submits faster may have this many seconds of them queued,
#: beyond :data:`PICKS_PER_SLOT`, up to :data:`MAX_ROOM_FACTOR` times that.
QUEUE_AHEAD_S = 0.25
MAX_ROOM_FACTOR = 3


class QueueDrain:
    """How fast the fleet takes messages off one queue, from the lengths a dispatcher reads
    and the messages it pushes in between; so that a busy fleet's dispatcher looks again
    when the queue is about half drained, not a fixed tick later. Other dispatchers'
    pushes only make the estimate lower (and the wait longer, never beyond a tick).
    """

    def __init__(self) -> None:
        self._seen: tuple[float, int] | None = None
        self._told_at = 0.0
        #: Messages per second, once two readings told it.
        self.rate: float | None = None

    def observe(self, length: int, now: float) -> None:
        """The queue is ``length`` long at ``now`` (monotonic seconds)."""
        previous, self._seen = self._seen, (now, length)
        if previous is None:
            return
        at, before = previous
        if now - at < DRAIN_READING_S:
            self._seen = previous  # too close to tell: the reading goes on
        elif before == 0:  # nothing to take: no reading
            if now - self._told_at > DRAIN_FORGET_S:
                self.rate = None
        else:
            self._told_at = now
            sample = max(0, before - length) / (now - at)
            if self.rate is None:
                self.rate = sample
            elif length == 0:  # it ran dry: the fleet could have taken more
                self.rate = max(self.rate, sample)
            else:
                self.rate += DRAIN_SMOOTHING * (sample - self.rate)

    def pushed(self, count: int) -> None:
        """This dispatcher has just pushed ``count`` messages onto the queue."""
        if self._seen is not None:
            self._seen = (self._seen[0], self._seen[1] + count)

    def within(self, seconds: float) -> int:
        """How many messages the fleet takes in ``seconds`` at the rate seen (0: unknown)."""
        return int(self.rate * seconds) if self.rate else 0

    def seconds_until(self, length: int, target: int, default: float) -> float:
        """When the queue, ``length`` long now, is down to ``target`` at the rate seen
        (``default`` before the rate is known), within [``MIN_WAIT_S``, ``default``]."""
        if not self.rate:
            return default
        return min(default, max(MIN_WAIT_S, (length - target) / self.rate))


class Dispatcher:
    """Claims due jobs and publishes their next step.

    Parameters:
        svc: the process's services (store, publisher, settings).
        slots: how many tasks this worker runs at once (its pool's size).
    """

    def __init__(self, svc: Services, slots: int = 1, queues: Iterable[str] = QUEUES) -> None:
        self.svc = svc
        self.slots = max(1, slots)
        self.fleet_slots = self.slots
        self.queues = sorted(queues)
        self.fleet_queues = set(self.queues)
        self._started = time.monotonic()
        self._unconsumed: set[str] = set()
        self._last_heartbeat = float("-inf")
        self._last_prune = time.monotonic()
        self._failing: set[str] = set()
        self._first_picker: str | None = None
        self._store_run_id: str | None = None
        self._store_changed_at: float | None = None
        self.picker = Picker(svc)
        self._next_orphan_check = time.monotonic() + HEARTBEAT_S
        self._submit_drain = QueueDrain()
        #: Jobs waiting in each provider's lines, as the last round read them.
        self.waiting: dict[str, int] = {}
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        #: This worker's members of WORKER_SLOTS and WORKER_QUEUES.
        self._slots_member = f"{self.name} {self.slots}"
        self._queues_member = f"{self.name} {','.join(self.queues)}"

    def heartbeat(self) -> None:
        """Say this worker process is alive (``/healthz`` lists live workers) and how many
        slots it has; learn how many the live fleet has (:attr:`fleet_slots`)."""
        now = self.svc.clock.now()
        pipe = self.svc.broker.pipeline(transaction=False)
        pipe.zadd(keys.WORKERS, {self.name: now})
        pipe.zremrangebyscore(keys.WORKERS, "-inf", now - HEARTBEAT_FORGET_S)
        pipe.zadd(keys.WORKER_QUEUES, {self._queues_member: now})
        pipe.zremrangebyscore(keys.WORKER_QUEUES, "-inf", now - LIVE_WORKER_S)
        pipe.zadd(keys.WORKER_SLOTS, {self._slots_member: now})
        pipe.zremrangebyscore(keys.WORKER_SLOTS, "-inf", now - LIVE_WORKER_S)
        for provider in configured_providers(self.svc.settings):
            pipe.zadd(keys.provider_workers(provider), {self.name: now})
            pipe.zremrangebyscore(keys.provider_workers(provider), "-inf", now - LIVE_WORKER_S)
        pipe.zrangebyscore(keys.WORKER_QUEUES, now - LIVE_WORKER_S, "+inf")
        pipe.zrangebyscore(keys.WORKER_SLOTS, now - LIVE_WORKER_S, "+inf")
        *_, queues, live = pipe.execute()
        self.fleet_slots = max(self.slots, sum(map(_slots_of, live)))
        self.fleet_queues = set(self.queues) | _queues_of(queues)

    def leave(self) -> None:
        """Take this worker out of the live fleet at once (a clean shutdown), so that its
        slots and queues do not count for another :data:`LIVE_WORKER_S`."""
        pipe = self.svc.broker.pipeline(transaction=False)
        pipe.zrem(keys.WORKERS, self.name)
        pipe.zrem(keys.WORKER_SLOTS, self._slots_member)
        pipe.zrem(keys.WORKER_QUEUES, self._queues_member)
        for provider in configured_providers(self.svc.settings):
            pipe.zrem(keys.provider_workers(provider), self.name)
        pipe.execute()

    def warn_unconsumed(self, waiting: Iterable[str]) -> None:
        """Log once (until it changes) each queue holding messages that no live worker
        consumes; only after every live worker had time for a heartbeat."""
        if time.monotonic() - self._started < LIVE_WORKER_S:
            return
        unconsumed = set(waiting) - self.fleet_queues
        for queue in sorted(unconsumed - self._unconsumed):
            logger.warning(
                "dispatcher: messages wait in queue %s and no live worker consumes it; start "
                "a worker with -Q %s (or without -Q): until then they wait forever",
                queue,
                queue,
            )
        self._unconsumed = unconsumed

    def tick(self) -> int:
        """One round: claim what is due and send it; returns how many messages were sent."""
        if time.monotonic() - self._last_heartbeat >= HEARTBEAT_S:
            self.heartbeat()
            self.watch_store()
            self.warn_unconsumed(oldest_waiting(self.svc))
            self._last_heartbeat = time.monotonic()
        if time.monotonic() - self._last_prune >= PRUNE_S:
            self._last_prune = time.monotonic()
            self.svc.store.prune_indexes(self.svc.settings.record_lifetime_s)
        self.svc.publisher.flush_events()  # the task-sent events of earlier rounds
        due, self.waiting = due_schedules(self.svc.store.redis, PROVIDERS)
        wanted = self.picker.wanted(self.waiting)
        orphans = self.picker.orphans(self.waiting)
        if not due and not wanted and not orphans:  # an idle round costs one round trip
            return 0
        waiting = oldest_waiting(self.svc)
        self.warn_unconsumed(waiting)
        sent = self._pick_jobs(wanted) + self._hand_out_orphans(orphans)
        sent += self._dispatch_jobs(waiting) if keys.SCHEDULE in due else 0
        if keys.NOTIFY_SCHEDULE in due:
            sent += self._dispatch_apart(
                "completion webhooks",
                lambda: dispatch_notifications(
                    self.svc, waiting.get(NOTIFY_QUEUE), self.fleet_slots
                ),
            )
        if keys.ARCHIVE_SCHEDULE in due:
            sent += self._dispatch_apart(
                "archiving",
                lambda: dispatch_archives(self.svc, waiting.get(ARCHIVE_QUEUE), self.fleet_slots),
            )
        return sent

    def after_outage(self, began_at: float | None) -> int:
        """Once Redis and the broker answer again: send again at once the jobs whose message
        was handed out before the outage (``began_at``, fleet clock; None: unknown) and
        was dropped by the worker that held it, instead of after their lease.

        Not when the job store restarted or failed over during the outage or within a lease
        before it: it may have lost the record that a step began (and opened its attempt),
        and that step may still wait for its createTask answer; only the lease is long
        enough to outlast it.
        """
        if self._store_restarted_since(began_at):
            logger.warning(
                "dispatcher: the job store restarted or failed over during the outage and may "
                "have lost its last writes; jobs taken before it are sent again after their lease"
            )
            return 0
        stranded = self.svc.store.resend_stranded(
            self.svc.settings.lease_s,
            handed_out_before=began_at,
            oldest_waiting=oldest_waiting(self.svc),
        )
        if stranded:
            self.svc.metrics.incr("lease_resends_total", stranded)
            logger.warning(
                "dispatcher: %d job(s) whose message was taken before the outage and never "
                "began are sent again",
                stranded,
            )
        return stranded

    def watch_store(self) -> None:
        """Note when the job store's server changed (a restart or a failover)."""
        run_id = self.svc.store.server_run_id()
        if run_id != self._store_run_id and self._store_run_id is not None:
            self._store_changed_at = self.svc.clock.now()
            logger.warning(
                "dispatcher: the job store restarted or failed over; no job is given a send "
                "moment for a lease (%.0f s), so that no step still in flight is sent again",
                self.svc.settings.lease_s + HEARTBEAT_S,
            )
        self._store_run_id = run_id

    def _submit_room(self) -> tuple[int, float]:
        """How many jobs may be picked now, and if none, how long until there may be.

        A send moment is void if its step does not start within ``GRANT_VALID_S``, so no
        more are picked than the live fleet's slots can soon take (:data:`PICKS_PER_SLOT`
        each, or what it took in :data:`QUEUE_AHEAD_S` lately if more, up to
        :data:`MAX_ROOM_FACTOR` times that; less the submits already queued). None while
        more than half of that is queued: a busy fleet's dispatcher then picks many jobs in
        one round rather than one or two in every round, and looks again when about half is
        left at the rate the fleet takes them (:class:`QueueDrain`), not a whole tick later,
        when a fast fleet has run dry."""
        queued = int(self.svc.broker.llen(SUBMIT_QUEUE))
        self._submit_drain.observe(queued, time.monotonic())
        floor = self.fleet_slots * PICKS_PER_SLOT
        ahead = min(self._submit_drain.within(QUEUE_AHEAD_S), floor * MAX_ROOM_FACTOR)
        capacity = max(floor, ahead)
        if queued > capacity // 2:
            return 0, self._submit_drain.seconds_until(queued, capacity // 2, TICK_S)
        return capacity - queued, 0.0

    def _store_settled(self) -> bool:
        """Whether picking is safe: not within a lease of a change of the job store's
        server. A failover may have lost a pick, so the job is back in its line while the
        step it was picked for may still wait for its createTask answer; only the lease is
        long enough to outlast it. Asked before every round of picks, so a change is seen
        before the next pick (a server that does not say who it is cannot be watched)."""
        self.watch_store()
        changed = self._store_changed_at
        if changed is None:
            return True
        return self.svc.clock.now() - changed >= self.svc.settings.lease_s + HEARTBEAT_S

    def _store_restarted_since(self, began_at: float | None) -> bool:
        """Whether the job store may have changed since ``began_at`` (True when it does
        not say who it is: then nothing tells a lost write from a step not begun)."""
        known = self._store_run_id
        self.watch_store()
        if self._store_run_id is None:
            return True
        if known is None or self._store_changed_at is None:
            return False
        since = (
            began_at if began_at is not None else self.svc.clock.now() - self.svc.settings.lease_s
        )
        # A step whose begin a failover lost may wait for its createTask answer for up to a
        # lease after the failover (seen by a heartbeat up to HEARTBEAT_S after it).
        return self._store_changed_at >= since - self.svc.settings.lease_s - HEARTBEAT_S

    def _dispatch_apart(self, what: str, dispatch: Callable[[], int]) -> int:
        """Send due webhooks or archiving; an error is logged (once per outage), not raised.

        An entry whose message was not sent stays in its schedule and comes back after its
        lease, so nothing is lost by not raising.
        """
        try:
            sent = dispatch()
        except Exception as exc:
            if what not in self._failing:
                logger.warning(
                    "dispatcher: cannot send %s (%s: %s); retrying", what, type(exc).__name__, exc
                )
            self._failing.add(what)
            return 0
        if what in self._failing:
            logger.warning("dispatcher: %s are sent again", what)
        self._failing.discard(what)
        return sent

    def seconds_to_next_round(self, default: float) -> float:
        """How long the thread may wait before the next round: at most ``default``, less
        when a budget's next moment comes sooner and jobs wait for it."""
        soonest = self.picker.seconds_to_next(self.waiting)
        return default if soonest is None else min(default, max(MIN_WAIT_S, soonest))

    def _pick_jobs(self, providers: list[str]) -> int:
        """Give each provider's free send moments to the next jobs in its lines; none for a
        lease after the job store restarted or failed over (:meth:`_store_settled`)."""
        if not providers or not self._store_settled():
            return 0
        sent = 0
        for provider in self._in_turn(providers):
            room, wait = self._submit_room()
            if room <= 0:
                self.picker.wait(providers, wait)  # the fleet is busy: look again later
                break
            picked = self.picker.pick(provider, self.waiting[provider], room)
            if picked:
                self._send(picked)
                if not sent:
                    self._first_picker = provider
                sent += len(picked)
        return sent

    def _in_turn(self, providers: list[str]) -> list[str]:
        """``providers`` starting after the one that picked first last time: on a busy
        fleet the first asked may take all the room, so a fixed order would keep the
        others' lines waiting."""
        if self._first_picker not in providers:
            return providers
        after = providers.index(self._first_picker) + 1
        return providers[after:] + providers[:after]

    def _hand_out_orphans(self, providers: list[str]) -> int:
        """Jobs of providers that no live worker can send are handed out to fail (checked
        at most every :data:`ORPHAN_CHECK_S`; a worker that can send them may be starting)."""
        now = time.monotonic()
        if not providers or now < self._next_orphan_check:
            return 0
        self._next_orphan_check = now + ORPHAN_CHECK_S
        since = self.svc.clock.now() - LIVE_WORKER_S
        sent = 0
        for provider in providers:
            if self.svc.broker.zcount(keys.provider_workers(provider), since, "+inf"):
                continue
            handed = self.picker.hand_out_orphans(provider, self.waiting[provider])
            if handed:
                self._send(handed)
                sent += len(handed)
        return sent

    def _dispatch_jobs(self, waiting: dict[str, float]) -> int:
        """Claim the jobs whose next step is due and publish their messages."""
        claimed = self.svc.store.claim_due(
            CLAIM_LIMIT, self.svc.settings.lease_s, oldest_waiting=waiting
        )
        if not claimed:
            return 0
        resent = sum(1 for d in claimed if d.resent)
        if resent:
            self.svc.metrics.incr("lease_resends_total", resent)
        self._send(claimed)
        return len(claimed)

    def _send(self, claimed: list[Dispatch]) -> None:
        """Publish the claimed jobs' messages in one round trip; if it fails, they are all
        due again at once rather than after the lease (a copy delivered anyway is dropped
        as stale by its dispatch token)."""
        try:
            self._publish(claimed)
        except BaseException:
            self.svc.store.due_now({d.job_id for d in claimed})
            raise

    def _publish(self, claimed: list[Dispatch]) -> None:
        publisher = self.svc.publisher
        polls = [d for d in claimed if d.phase == "poll"]
        with publisher.batch() as producer:
            for item in claimed:
                if item.phase == "submit":
                    publisher.submit(item.job_id, item.request, item.token, producer=producer)
            for start in range(0, len(polls), POLL_BATCH_SIZE):
                batch = polls[start : start + POLL_BATCH_SIZE]
                publisher.poll([(d.job_id, d.token, d.due) for d in batch], producer=producer)
        self._submit_drain.pushed(len(claimed) - len(polls))


#: The schedules a dispatcher round hands out from: jobs' steps, webhooks, archiving.
SCHEDULES = (keys.SCHEDULE, keys.NOTIFY_SCHEDULE, keys.ARCHIVE_SCHEDULE)


def due_schedules(
    client: redis.Redis, providers: Iterable[str] = ()
) -> tuple[set[str], dict[str, int]]:
    """The schedules whose first entry is due now (on the Redis clock their scores use),
    and how many jobs wait in each provider's lines, read in one round trip, so that a
    round with nothing to do runs no script."""
    names = list(providers)
    pipe = client.pipeline(transaction=False)
    pipe.time()
    for schedule in SCHEDULES:
        pipe.zrange(schedule, 0, 0, withscores=True)
    for provider in names:
        pipe.get(keys.lines_count(provider))
    (seconds, micros), *replies = pipe.execute()
    heads, counts = replies[: len(SCHEDULES)], replies[len(SCHEDULES) :]
    now = seconds + micros / 1e6
    due = {key for key, head in zip(SCHEDULES, heads, strict=True) if head and head[0][1] <= now}
    return due, {p: max(0, int(n or 0)) for p, n in zip(names, counts, strict=True)}


def _slots_of(member: bytes | str) -> int:
    """The pool size in a ``WORKER_SLOTS`` member (``"<worker> <slots>"``); 1 if unreadable."""
    text = member.decode(errors="replace") if isinstance(member, bytes) else member
    size = text.rsplit(" ", 1)[-1]
    return int(size) if size.isdigit() else 1


def _queues_of(members: Iterable[bytes | str]) -> set[str]:
    """The queues named by ``WORKER_QUEUES`` members (``"<worker> <q>,<q>"``)."""
    found: set[str] = set()
    for member in members:
        text = member.decode(errors="replace") if isinstance(member, bytes) else member
        found.update(q for q in text.rsplit(" ", 1)[-1].split(",") if q)
    return found


def queues_without_workers(svc: Services) -> list[str]:
    """The pipeline's queues that no live worker consumes (by their heartbeats)."""
    since = svc.clock.now() - LIVE_WORKER_S
    members = cast("list[bytes]", svc.broker.zrangebyscore(keys.WORKER_QUEUES, since, "+inf"))
    return [queue for queue in QUEUES if queue not in _queues_of(members)]


def oldest_waiting(svc: Services) -> dict[str, float]:
    """For each queue holding messages: when its oldest waiting message was sent.

    The Redis transport pushes at the head of a list and takes from its tail, so the tail
    is the oldest. A message without our send-time header (from a producer in another
    language) counts as very old, which only delays re-sends while it waits.
    """
    pipe = svc.broker.pipeline(transaction=False)
    for queue in QUEUES:
        pipe.lindex(queue, -1)
    waiting = {}
    for queue, raw in zip(QUEUES, pipe.execute(), strict=True):
        if raw is not None:
            waiting[queue] = _sent_at(raw)
    return waiting


def _sent_at(raw: bytes | str) -> float:
    try:
        headers = json.loads(raw).get("headers") or {}
        return float(headers.get(SENT_AT_HEADER, 0.0))
    except (ValueError, TypeError, AttributeError, RecursionError):
        return 0.0


class DispatcherThread:
    """Runs :meth:`Dispatcher.tick` in a loop until stopped."""

    def __init__(self, make_dispatcher: Callable[[], Dispatcher]) -> None:
        self._make = make_dispatcher
        self._dispatcher: Dispatcher | None = None
        self._stop = threading.Event()
        self._returned = threading.Event()
        self._lock = threading.Lock()
        self._outage_began: float | None = None
        self._outage_seen = False
        self._thread = threading.Thread(target=self._run, name="remixq-dispatcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._dispatcher is not None:
            with contextlib.suppress(Exception):  # Redis gone: the heartbeat ages out
                self._dispatcher.leave()

    def broker_lost(self) -> None:
        """This worker's consumer lost its broker connection (and dropped the messages it
        had taken but not started)."""
        with self._lock:
            if self._outage_began is None:
                self._outage_began = _fleet_time(self._dispatcher)
                self._outage_seen = True

    def broker_returned(self) -> None:
        """This worker's consumer is connected again: look for jobs it left stranded."""
        self._returned.set()

    def _run(self) -> None:
        dispatcher: Dispatcher | None = None
        failing = False
        while not self._stop.is_set():
            try:
                dispatcher = self._dispatcher = dispatcher or self._make()
                if failing or self._returned.is_set():
                    self._resend_stranded(dispatcher)
                sent = dispatcher.tick()
                if failing:
                    logger.warning("dispatcher: Redis and the broker answer again")
                failing = False
            except Exception as exc:
                if not failing:  # once per outage, not once per round
                    logger.warning(
                        "dispatcher: cannot dispatch (%s: %s); retrying", type(exc).__name__, exc
                    )
                    self.broker_lost()
                failing = True
                self._stop.wait(ERROR_PAUSE_S)
                continue
            if sent < CLAIM_LIMIT:
                self._stop.wait(dispatcher.seconds_to_next_round(TICK_S))
        if dispatcher is not None:
            with contextlib.suppress(Exception):  # best effort, as every task event
                dispatcher.svc.publisher.flush_events(now=True)

    def _resend_stranded(self, dispatcher: Dispatcher) -> None:
        """After an outage this thread or the consumer saw: send the jobs it stranded."""
        self._returned.clear()
        with self._lock:
            began, seen = self._outage_began, self._outage_seen
        if not seen:
            return
        try:
            dispatcher.after_outage(began)
        except BaseException:
            self._returned.set()  # tried again next round
            raise
        with self._lock:
            if self._outage_began == began:
                self._outage_began, self._outage_seen = None, False


def _fleet_time(dispatcher: Dispatcher | None) -> float | None:
    """The fleet clock now, from its last measurement (None before the first). Called from
    the consumer's thread as it loses the broker: asking Redis could block it for as long
    as the Redis client retries."""
    return None if dispatcher is None else dispatcher.svc.clock.last_known()
