"""What the sections share: the run's sizes and state, and the helpers to enqueue and wait.

Every figure comes from this run: upstream counts from the sandbox's
``/_sandbox/stats``, job outcomes from the job records (read through the pipeline's own
:class:`~worker.jobstore.JobStore`, so the benchmark never depends on how a record is
stored), memory and CPU from ``/proc``. Every wait is bounded; a bound that runs out is
reported in a note instead of hanging the run.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from bench import naive
from bench.report import Figure
from bench.stack import Stack
from producers import enqueue_remix
from sandbox.control import SandboxControl
from sandbox.launch import ManagedProcess
from worker.jobstore import JobStore
from worker.models import FINISHED_STATES, JobRecord, JobState
from worker.runtime import services

SOURCE_IMAGE = "https://example.com/remixq-bench/source.png"
REFERENCE_IMAGE = "https://example.com/remixq-bench/character.png"
#: A budget so large that it never holds a submit back ("no rate limit").
NO_RATE_LIMIT = "100000/1s"
CONCURRENCY = 2
#: Records read per round trip.
STATE_BATCH = 2000
WAIT_POLL_S = 0.5
STATS_POLL_S = 1.0
PIPELINE_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Plan:
    """Sizes of one run; ``--quick`` takes the smaller ones."""

    rate_fleets: tuple[int, ...]
    rate_window_s: float
    rate_warmup_s: float
    inflight_jobs: int
    inflight_fill_timeout_s: float
    inflight_observe_s: float
    e2e_jobs: int
    overhead_jobs: int

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls((1, 6), 20.0, 5.0, 1000, 120.0, 30.0, 20, 200)
        return cls((1, 3, 6), 40.0, 5.0, 10000, 300.0, 75.0, 40, 1000)


@dataclass(frozen=True)
class Upstream:
    """Requests one batch of jobs made upstream."""

    jobs: int
    create_requests: int
    record_requests: int


@dataclass
class Run:
    """What the sections share: the processes, the sizes and the upstream counts."""

    stack: Stack
    plan: Plan
    upstream: dict[str, Upstream] = field(default_factory=dict)


Section = Callable[[Run], list[Figure]]


@dataclass(frozen=True)
class Batch:
    """Jobs enqueued together, and when the first and the last went in."""

    ids: list[str]
    started: float
    ended: float

    @property
    def rate(self) -> float:
        return len(self.ids) / max(self.ended - self.started, 1e-9)


# ----------------------------------------------------------------- jobs and records


def enqueue_jobs(count: int, prompt: str) -> Batch:
    """Enqueue ``count`` jobs through the public producer API, one after the other."""
    started = time.time()
    ids = [
        enqueue_remix(prompt=prompt, image_url=SOURCE_IMAGE, reference_image_urls=[REFERENCE_IMAGE])
        for _ in range(count)
    ]
    return Batch(ids, started, time.time())


def remix_request(prompt: str) -> dict[str, Any]:
    """The createTask ``input`` the naive worker sends (the same fields as the pipeline's)."""
    return {"prompt": prompt, "image_url": SOURCE_IMAGE, "reference_image_urls": [REFERENCE_IMAGE]}


def job_store() -> JobStore:
    """The job store of this process: the benchmark's Redis once the stack started it."""
    return services().store


def _chunks(ids: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(ids), STATE_BATCH):
        yield ids[start : start + STATE_BATCH]


def job_states(ids: Sequence[str]) -> dict[str, str]:
    """The state of each job ("missing" when it has no record)."""
    store = job_store()
    found: dict[str, str] = {}
    for chunk in _chunks(ids):
        for job_id, state in zip(chunk, store.states(chunk), strict=True):
            found[job_id] = "missing" if state is None else state
    return found


def job_records(ids: Sequence[str]) -> list[JobRecord]:
    """The records of the jobs that have one."""
    store = job_store()
    return [r for chunk in _chunks(ids) for r in store.get_many(chunk) if r is not None]


def finished_records(ids: Sequence[str]) -> list[JobRecord]:
    """The records of the jobs that finished."""
    return [r for r in job_records(ids) if r.finished]


def wait_for_states(
    ids: Sequence[str], wanted: Iterable[str], timeout: float
) -> tuple[Counter[str], bool]:
    """Wait until every job is in one of ``wanted`` (or finished).

    :returns: the counts of states at the end and whether the wait succeeded in time.
    """
    targets = set(wanted) | FINISHED_STATES
    deadline = time.monotonic() + timeout
    pending = list(ids)
    while True:
        states = job_states(pending)
        pending = [job_id for job_id, state in states.items() if state not in targets]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(WAIT_POLL_S)
    counts = Counter(job_states(ids).values())
    return counts, not pending


def wait_for_results(app: Celery, task_ids: Sequence[str], timeout: float) -> dict[str, Any]:
    """Wait for Celery results of ``app``; returns each finished task's result meta."""
    backend: Any = app.backend
    client = redis.Redis.from_url(app.conf.result_backend)
    metas: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(metas) < len(task_ids) and time.monotonic() < deadline:
            pending = [t for t in task_ids if t not in metas]
            raws = client.mget([backend.get_key_for_task(t) for t in pending])
            for task_id, raw in zip(pending, raws, strict=True):
                if raw is not None:
                    meta = backend.decode_result(raw)
                    if meta.get("status") in ("SUCCESS", "FAILURE"):
                        metas[task_id] = meta
            if len(metas) < len(task_ids):
                time.sleep(WAIT_POLL_S)
    finally:
        client.close()
    return metas


# ----------------------------------------------------------------- the processes


def private_redis(stack: Stack) -> redis.Redis:
    """A client of the stack's private Redis (for figures that are not job records)."""
    assert stack.redis is not None, "the stack's Redis is not started"
    return stack.redis


def redis_memory(client: redis.Redis) -> int:
    """Bytes Redis uses for data (``used_memory``)."""
    return int(client.info("memory")["used_memory"])


def upstream_counts(control: SandboxControl, jobs: int) -> Upstream:
    stats = control.stats()
    return Upstream(jobs, int(stats["create_requests"]), int(stats["record_requests"]))


def stop_started(stack: Stack, processes: Sequence[ManagedProcess | None]) -> None:
    """Stop the processes that did start (a start that failed left None)."""
    stack.stop([p for p in processes if p is not None])


def percentile(values: Sequence[float], share: float) -> float:
    """The ``share`` quantile (0..1) of ``values``, by linear interpolation."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = share * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ------------------------------------------------------------- throughput (3 and 4)


@dataclass(frozen=True)
class Throughput:
    """Jobs that finished well, and the time from the first enqueue to the last finish.

    :param done: jobs (or tasks) that succeeded.
    :param total: jobs sent.
    :param seconds: first enqueue to last finish.
    :param latencies: per job, seconds from its enqueue to its finish.
    """

    done: int
    total: int
    seconds: float
    latencies: tuple[float, ...] = ()

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def note(self) -> str:
        text = f"{self.done} of {self.total} in {self.seconds:.1f} s"
        if self.latencies:
            text += (
                f"; per job p50 {percentile(self.latencies, 0.5):.1f} s, "
                f"max {max(self.latencies):.1f} s from enqueue to finish"
            )
        return text


def pipeline_throughput(
    run: Run,
    sandbox: ManagedProcess,
    control: SandboxControl,
    *,
    jobs: int,
    label: str,
    settings: dict[str, str],
) -> Throughput:
    """One pipeline worker (concurrency 2) works off ``jobs`` jobs; upstream counts kept."""
    stack = run.stack
    stack.flush()
    control.reset()
    workers = stack.start_workers(sandbox, 1, concurrency=CONCURRENCY, settings=settings)
    try:
        batch = enqueue_jobs(jobs, f"bench {label}")
        wait_for_states(batch.ids, (), PIPELINE_TIMEOUT_S)
        records = finished_records(batch.ids)
    finally:
        stack.stop(workers)
    run.upstream[label] = upstream_counts(control, jobs)
    succeeded = [r for r in records if r.state is JobState.SUCCEEDED]
    if not succeeded:
        return Throughput(0, jobs, 0.0)
    last = max(r.finished_at or 0.0 for r in succeeded)
    latencies = tuple((r.finished_at or 0.0) - r.created_at for r in succeeded)
    return Throughput(len(succeeded), jobs, last - batch.started, latencies)


def naive_throughput(
    run: Run,
    sandbox: ManagedProcess,
    control: SandboxControl,
    *,
    send: Callable[[], Any],
    jobs: int,
    timeout: float,
    label: str | None = None,
) -> Throughput:
    """One naive worker (concurrency 2) runs ``jobs`` tasks sent by ``send``."""
    stack = run.stack
    stack.flush()
    control.reset()
    workers = stack.start_workers(sandbox, 1, concurrency=CONCURRENCY, settings={}, naive=True)
    try:
        started = time.time()
        ids = [send().id for _ in range(jobs)]
        metas = wait_for_results(naive.app, ids, timeout)
    finally:
        stack.stop(workers)
    if label is not None:
        run.upstream[label] = upstream_counts(control, jobs)
    finished = [
        meta["result"] if isinstance(meta["result"], float) else meta["result"]["finished_at"]
        for meta in metas.values()
        if meta["status"] == "SUCCESS"
        and (isinstance(meta["result"], float) or meta["result"].get("state") == "success")
    ]
    if not finished:
        return Throughput(0, jobs, 0.0)
    return Throughput(len(finished), jobs, max(finished) - started)
