"""The benchmark's sections; each starts what it needs, measures, stops it and returns rows.

Every figure comes from this run: upstream counts from the sandbox's
``/_sandbox/stats``, job outcomes from the job records, memory and CPU from
``/proc``. Every wait is bounded; a bound that runs out is reported in a note
instead of hanging the run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from bench import naive
from bench.procfs import cpu_seconds, tree_usage
from bench.report import Figure, ratio
from bench.stack import Stack
from producers import enqueue_remix, get_job
from sandbox.control import SandboxControl
from sandbox.launch import ManagedProcess
from worker.backoff import poll_delay
from worker.jobstore import JOB_KEY
from worker.models import FINISHED_STATES, JobRecord
from worker.settings import parse_rate_limit
from worker.tasks import POLL_LATENESS_KEY

MB = 1_000_000
KB = 1_000
SOURCE_IMAGE = "https://example.com/remixq-bench/source.png"
REFERENCE_IMAGE = "https://example.com/remixq-bench/character.png"
#: The upstream budget of section 1, on both sides.
RATE_LIMIT = "20/10s"
#: A budget so large that it never holds a submit back ("no rate limit").
NO_RATE_LIMIT = "100000/1s"
CONCURRENCY = 2
IN_FLIGHT_STATES = frozenset({"submitted", "running"})
STATE_BATCH = 2000
WAIT_POLL_S = 0.5
STATS_POLL_S = 1.0


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


# ----------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Batch:
    """Jobs enqueued together, and when the first and the last went in."""

    ids: list[str]
    started: float
    ended: float

    @property
    def rate(self) -> float:
        return len(self.ids) / max(self.ended - self.started, 1e-9)


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


def job_fields(client: redis.Redis, ids: Sequence[str], name: str) -> dict[str, Any]:
    """One field of each job's record (decoded; None when absent), in pipelined batches."""
    values: dict[str, Any] = {}
    for start in range(0, len(ids), STATE_BATCH):
        chunk = ids[start : start + STATE_BATCH]
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hget(JOB_KEY.format(job_id), name)
        for job_id, raw in zip(chunk, pipe.execute(), strict=True):
            values[job_id] = None if raw is None else json.loads(raw)
    return values


def job_states(client: redis.Redis, ids: Sequence[str]) -> dict[str, str]:
    """The state of each job ("missing" when it has no record), read from the job store."""
    return {
        job_id: "missing" if state is None else str(state)
        for job_id, state in job_fields(client, ids, "state").items()
    }


def wait_for_states(
    client: redis.Redis, ids: Sequence[str], wanted: Iterable[str], timeout: float
) -> tuple[Counter[str], bool]:
    """Wait until every job is in one of ``wanted`` (or finished); returns the state counts.

    :returns: the counts of states at the end and whether the wait succeeded in time.
    """
    targets = set(wanted) | FINISHED_STATES
    deadline = time.monotonic() + timeout
    pending = list(ids)
    while True:
        states = job_states(client, pending)
        pending = [job_id for job_id, state in states.items() if state not in targets]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(WAIT_POLL_S)
    counts = Counter(job_states(client, ids).values())
    return counts, not pending


def finished_records(ids: Sequence[str]) -> list[JobRecord]:
    """The records of the jobs that finished."""
    records = [get_job(job_id) for job_id in ids]
    return [r for r in records if r is not None and r.finished]


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


def upstream_counts(control: SandboxControl, jobs: int) -> Upstream:
    stats = control.stats()
    return Upstream(jobs, int(stats["create_requests"]), int(stats["record_requests"]))


def percentile(values: Sequence[float], share: float) -> float:
    """The ``share`` quantile (0..1) of ``values``, by linear interpolation."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = share * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def redis_memory(client: redis.Redis) -> int:
    """Bytes Redis uses for data (``used_memory``)."""
    return int(client.info("memory")["used_memory"])


def _stop_started(stack: Stack, processes: Sequence[ManagedProcess | None]) -> None:
    stack.stop([p for p in processes if p is not None])


# ---------------------------------------------------------------- 1. rate limit


@dataclass(frozen=True)
class RateMeasurement:
    """Accepted createTask per second over a steady window, and the 429s around it.

    :param rate: accepted createTask per second.
    :param accepted: acceptances the rate is based on.
    :param span: seconds they spanned.
    :param saturated: whether the window was filled (else the rate is a plain count).
    :param rate_limited: 429 answers from the first enqueue to the end of the window.
    :param create_requests: createTask requests in the same time.
    :param seconds: that time.
    """

    rate: float
    accepted: int
    span: float
    saturated: bool
    rate_limited: int
    create_requests: int
    seconds: float


def measure_acceptance(
    control: SandboxControl, started: float, *, limit: int, warmup: float, window: float
) -> RateMeasurement:
    """Watch the sandbox's acceptances until ``window`` seconds of steady state are seen.

    The window starts at the first acceptance at least ``warmup`` seconds after the
    first one (past the initial burst). The rate is ``k / (t[i + k] - t[i])`` with
    ``k`` a whole number of limit windows' worth of requests: ``i`` and ``i + k`` are
    then in the same phase of any bursty pattern the limit produces, so a fleet
    that uses its whole budget scores exactly the allowed rate and never more.
    """
    periods = max(1, math.floor(window / parse_rate_limit(RATE_LIMIT)[1]))
    needed = limit * periods
    deadline = started + warmup + window * 1.5 + 15.0
    while True:
        stats = control.stats()
        accepted = sorted(stats["accepted_at"])
        start_index = _first_after(accepted, accepted[0] + warmup) if accepted else None
        now = time.time()
        if start_index is not None and len(accepted) > start_index + needed:
            first, last = accepted[start_index], accepted[start_index + needed]
            return RateMeasurement(
                needed / (last - first),
                needed,
                last - first,
                True,
                int(stats["rate_limited"]),
                int(stats["create_requests"]),
                now - started,
            )
        if now >= deadline:
            break
        time.sleep(STATS_POLL_S)
    if start_index is None:
        return RateMeasurement(
            0.0, 0, 0.0, False, stats["rate_limited"], stats["create_requests"], now - started
        )
    first = accepted[start_index]
    span = min(window, now - first)
    count = sum(1 for t in accepted[start_index:] if t < first + span)
    return RateMeasurement(
        count / span if span > 0 else 0.0,
        count,
        span,
        False,
        int(stats["rate_limited"]),
        int(stats["create_requests"]),
        now - started,
    )


def _first_after(ordered: Sequence[float], moment: float) -> int | None:
    return next((i for i, t in enumerate(ordered) if t >= moment), None)


def rate_limit_section(run: Run) -> list[Figure]:
    """Accepted createTask/s against the key's budget, for growing fleets."""
    stack, plan = run.stack, run.plan
    limit, window = parse_rate_limit(RATE_LIMIT)
    allowed = limit / window
    # Enough jobs that the key stays saturated past the longest measurement.
    jobs = math.ceil(allowed * (plan.rate_warmup_s + plan.rate_window_s * 1.5) * 1.5) + limit
    sandbox = stack.start_sandbox(["--generation-seconds", "1", "--rate-limit", RATE_LIMIT])
    control = SandboxControl(sandbox.url or "")
    figures: list[Figure] = []
    section = "1 rate limit"
    try:
        for fleet in plan.rate_fleets:
            stack.flush()
            control.reset()
            workers = stack.start_workers(
                sandbox, fleet, concurrency=CONCURRENCY, settings={"KIE_RATE_LIMIT": RATE_LIMIT}
            )
            try:
                batch = enqueue_jobs(jobs, f"bench rate limit {fleet}")
                result = measure_acceptance(
                    control,
                    batch.started,
                    limit=limit,
                    warmup=plan.rate_warmup_s,
                    window=plan.rate_window_s,
                )
                states = Counter(job_states(_redis(stack), batch.ids).values())
            finally:
                stack.stop(workers)
            label = f"{fleet} worker{'s' if fleet > 1 else ''} x {CONCURRENCY}"
            note = (
                f"{result.accepted} acceptances over {result.span:.1f} s"
                if result.saturated
                else f"key not saturated: {result.accepted} acceptances in {result.span:.1f} s"
            )
            if states.get("failed"):
                note += f"; {states['failed']} of {jobs} jobs failed by the end of the window"
            figures.append(
                Figure(
                    section,
                    f"{label}: accepted createTask/s",
                    f"{result.rate:.2f}/s",
                    f"{allowed:.2f}/s allowed ({RATE_LIMIT})",
                    ratio(result.rate, allowed, percent=True),
                    note,
                )
            )
            figures.append(
                Figure(
                    section,
                    f"{label}: 429 answers",
                    f"{result.rate_limited}",
                    "0",
                    "",
                    f"{result.rate_limited} of {result.create_requests} createTask requests "
                    f"in {result.seconds:.0f} s were answered 429",
                )
            )
    finally:
        control.close()
        stack.stop([sandbox])
    return figures


def _redis(stack: Stack) -> redis.Redis:
    assert stack.redis is not None, "the stack's Redis is not started"
    return stack.redis


# ---------------------------------------------------------- 2. in-flight capacity


INFLIGHT_GENERATION_S = 900
INFLIGHT_POLL_INITIAL_S = 2.0
INFLIGHT_POLL_MAX_S = 30.0
RSS_SAMPLE_S = 5.0
#: How many of the newest lateness samples make one point of the lateness trend.
LATENESS_RECENT = 500
POLL_TASK_MARK = "Task remix.poll["
SUCCEEDED_MARK = "] succeeded in "
WATCHDOG_MARK = "watchdog: job "


def scheduled_polls(submitted_at: Iterable[float], start: float, end: float) -> int:
    """Polls the backoff schedule asks for between ``start`` and ``end`` (unix times).

    Each job polls at ``submitted_at + d1 + ... + dk``, ``dk`` being the pipeline's own
    :func:`~worker.backoff.poll_delay`, as if every poll ran on time.
    """
    total = 0
    for moment in submitted_at:
        hop = 1
        while moment <= end:
            moment += poll_delay(hop, initial=INFLIGHT_POLL_INITIAL_S, maximum=INFLIGHT_POLL_MAX_S)
            hop += 1
            if start <= moment <= end:
                total += 1
    return total


@dataclass
class Observation:
    """What one worker did while many jobs were in flight."""

    seconds: float = 0.0
    scheduled: int = 0
    in_flight: int = 0
    rss_end: int = 0
    rss_peak: int = 0
    processes: int = 0
    cpu_seconds: float = 0.0
    main_cpu_seconds: float = 0.0
    polls: int = 0
    poll_tasks: int = 0
    watchdog_resends: int = 0
    lateness: list[float] = field(default_factory=list)
    lateness_present: bool = False
    #: (seconds into the window, p50 of the newest lateness samples) at each sample.
    lateness_trend: list[tuple[float, float]] = field(default_factory=list)
    #: (seconds into the window, recordInfo requests served so far) at each sample.
    served_trend: list[tuple[float, int]] = field(default_factory=list)
    #: CPU cores used in the window by the other processes on the machine.
    other_cores: dict[str, float] = field(default_factory=dict)

    def served_rate(self, first: bool) -> float:
        """recordInfo/s over the first (or last) third of the window."""
        if len(self.served_trend) < 2:
            return 0.0
        third = self.seconds / 3
        if first:
            points = [p for p in self.served_trend if p[0] <= third + RSS_SAMPLE_S / 2]
        else:
            points = [
                p for p in self.served_trend if p[0] >= self.seconds - third - RSS_SAMPLE_S / 2
            ]
        (t0, n0), (t1, n1) = points[0], points[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def _cpu_of(process: ManagedProcess | None) -> float:
    return 0.0 if process is None else tree_usage(process.popen.pid).cpu_seconds


def _recent_lateness(client: redis.Redis) -> float | None:
    """p50 of the newest lateness samples, or None when there are none."""
    values = []
    for raw in client.lrange(POLL_LATENESS_KEY, 0, LATENESS_RECENT - 1):
        try:
            values.append(float(raw))
        except ValueError:
            continue
    return percentile(values, 0.5) if values else None


def _log_counts(worker: ManagedProcess, offset: int) -> tuple[int, int]:
    """Poll tasks run and watchdog re-sends in the worker's log after ``offset``."""
    if worker.log_path is None:
        return 0, 0
    with worker.log_path.open("rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    polls = sum(
        1 for line in text.splitlines() if POLL_TASK_MARK in line and SUCCEEDED_MARK in line
    )
    return polls, text.count(WATCHDOG_MARK)


def _log_size(worker: ManagedProcess) -> int:
    return worker.log_path.stat().st_size if worker.log_path and worker.log_path.exists() else 0


def observe(
    stack: Stack,
    control: SandboxControl,
    worker: ManagedProcess,
    sandbox: ManagedProcess,
    ids: Sequence[str],
    seconds: float,
) -> Observation:
    """Watch the worker for ``seconds``: memory, CPU, polls served and poll lateness."""
    client = _redis(stack)
    client.delete(POLL_LATENESS_KEY)
    result = Observation()
    start_usage = tree_usage(worker.popen.pid)
    start_main = cpu_seconds(worker.popen.pid)
    others = {"sandbox": sandbox, "redis": stack.redis_process}
    start_other = {name: _cpu_of(process) for name, process in others.items()}
    start_own = time.process_time()
    start_polls = int(control.stats()["record_requests"])
    offset = _log_size(worker)
    started, window_start = time.monotonic(), time.time()
    while True:
        usage = tree_usage(worker.popen.pid)
        elapsed = time.monotonic() - started
        result.rss_peak = max(result.rss_peak, usage.rss_bytes)
        result.served_trend.append((elapsed, int(control.stats()["record_requests"])))
        recent = _recent_lateness(client)
        if recent is not None:
            result.lateness_trend.append((elapsed, recent))
        remaining = seconds - (time.monotonic() - started)
        if remaining <= 0:
            break
        time.sleep(min(RSS_SAMPLE_S, remaining))
    result.seconds = time.monotonic() - started
    result.polls = result.served_trend[-1][1] - start_polls
    result.rss_end = usage.rss_bytes
    result.processes = usage.processes
    result.cpu_seconds = usage.cpu_seconds - start_usage.cpu_seconds
    result.main_cpu_seconds = cpu_seconds(worker.popen.pid) - start_main
    result.other_cores = {
        name: (_cpu_of(process) - start_other[name]) / result.seconds
        for name, process in others.items()
    }
    result.other_cores["benchmark"] = (time.process_time() - start_own) / result.seconds
    result.poll_tasks, result.watchdog_resends = _log_counts(worker, offset)
    result.lateness_present = bool(client.exists(POLL_LATENESS_KEY))
    for raw in client.lrange(POLL_LATENESS_KEY, 0, -1) if result.lateness_present else []:
        try:
            result.lateness.append(float(raw))
        except ValueError:
            continue
    states = job_states(client, ids)
    in_flight = [job_id for job_id, state in states.items() if state in IN_FLIGHT_STATES]
    result.in_flight = len(in_flight)
    submitted = job_fields(client, in_flight, "submitted_at").values()
    result.scheduled = scheduled_polls(
        (float(t) for t in submitted if t is not None), window_start, window_start + result.seconds
    )
    return result


def inflight_section(run: Run) -> list[Figure]:
    """Many jobs in flight on one worker: memory, polls served and poll lateness."""
    stack, plan = run.stack, run.plan
    section = "2 in flight"
    jobs = plan.inflight_jobs
    stack.flush()
    sandbox = stack.start_sandbox(["--generation-seconds", str(INFLIGHT_GENERATION_S)])
    control = SandboxControl(sandbox.url or "")
    worker: ManagedProcess | None = None
    try:
        worker = stack.start_workers(
            sandbox,
            1,
            concurrency=CONCURRENCY,
            settings={
                "KIE_RATE_LIMIT": NO_RATE_LIMIT,
                "REMIX_POLL_INITIAL_S": f"{INFLIGHT_POLL_INITIAL_S:g}",
                "REMIX_POLL_MAX_S": f"{INFLIGHT_POLL_MAX_S:g}",
            },
        )[0]
        idle = tree_usage(worker.popen.pid)
        redis_idle = redis_memory(_redis(stack))
        batch = enqueue_jobs(jobs, "bench in flight")
        counts, filled = wait_for_states(
            _redis(stack), batch.ids, IN_FLIGHT_STATES, plan.inflight_fill_timeout_s
        )
        fill_seconds = time.time() - batch.started
        seen = observe(stack, control, worker, sandbox, batch.ids, plan.inflight_observe_s)
        redis_loaded = redis_memory(_redis(stack))
    finally:
        control.close()
        _stop_started(stack, [worker, sandbox])
    submitted = sum(counts[s] for s in IN_FLIGHT_STATES)
    fill_note = (
        f"all {jobs} accepted upstream {fill_seconds:.0f} s after the first enqueue"
        if filled
        else f"only {submitted} of {jobs} accepted after {fill_seconds:.0f} s "
        f"({dict(counts)}); observed anyway"
    )
    needed = seen.scheduled / seen.seconds
    polls_per_s = seen.polls / seen.seconds
    figures = [
        Figure(
            section,
            "producer: enqueue rate",
            f"{batch.rate:.0f} jobs/s",
            "",
            "",
            f"{jobs} jobs through enqueue_remix, one at a time",
        ),
        Figure(
            section,
            "fill: jobs accepted upstream/s",
            f"{submitted / fill_seconds:.0f} jobs/s",
            "",
            "",
            fill_note,
        ),
        Figure(
            section,
            "jobs in flight (observed)",
            f"{seen.in_flight}",
            f"{jobs} enqueued",
            ratio(seen.in_flight, jobs, percent=True),
            f"observed for {seen.seconds:.0f} s once the fill ended",
        ),
        Figure(
            section,
            "worker RSS, main + pool",
            f"{seen.rss_end / MB:.0f} MB",
            f"{idle.rss_bytes / MB:.0f} MB idle",
            ratio(seen.rss_end, idle.rss_bytes),
            f"peak {seen.rss_peak / MB:.0f} MB over {seen.processes} processes; "
            f"{(seen.rss_end - idle.rss_bytes) / max(seen.in_flight, 1) / KB:.1f} kB "
            "per job in flight",
        ),
        Figure(
            section,
            "Redis used memory",
            f"{redis_loaded / MB:.0f} MB",
            f"{redis_idle / MB:.1f} MB idle",
            "",
            f"{(redis_loaded - redis_idle) / max(jobs, 1) / KB:.1f} kB per job",
        ),
        Figure(
            section,
            "recordInfo polls/s served",
            f"{polls_per_s:.1f}/s",
            f"{needed:.1f}/s scheduled",
            ratio(polls_per_s, needed, percent=True),
            f"scheduled: what the poll backoff ({INFLIGHT_POLL_INITIAL_S:g} s growing to "
            f"{INFLIGHT_POLL_MAX_S:g} s) asks of the jobs in flight in the window, every poll "
            f"on time; {seen.polls} served, {seen.served_rate(first=True):.0f}/s in the "
            f"first third of the window, {seen.served_rate(first=False):.0f}/s in the last",
        ),
        Figure(
            section,
            "mean time between polls of a job",
            f"{seen.in_flight / polls_per_s:.0f} s" if polls_per_s else "never",
            f"{INFLIGHT_POLL_MAX_S:g} s (REMIX_POLL_MAX_S)",
            ratio(seen.in_flight / polls_per_s, INFLIGHT_POLL_MAX_S) if polls_per_s else "",
        ),
        Figure(
            section,
            "poll tasks run/s (worker log)",
            f"{seen.poll_tasks / seen.seconds:.1f}/s",
            f"{polls_per_s:.1f}/s with a request",
            ratio(seen.poll_tasks, seen.polls) if seen.polls else "",
            f"{seen.watchdog_resends} watchdog re-sends in the window",
        ),
        Figure(
            section,
            "worker CPU",
            f"{seen.cpu_seconds / seen.seconds:.2f} cores",
            f"{_cores()} cores in the machine",
            "",
            f"{seen.cpu_seconds / max(seen.poll_tasks, 1) * 1000:.1f} ms of CPU per poll task; "
            f"main process {seen.main_cpu_seconds / seen.seconds:.2f} cores, pool "
            f"{(seen.cpu_seconds - seen.main_cpu_seconds) / seen.seconds:.2f}; "
            "the other processes used "
            + ", ".join(f"{name} {cores:.2f}" for name, cores in seen.other_cores.items())
            + " cores",
        ),
        _lateness_figure(section, seen),
    ]
    return figures


def _lateness_figure(section: str, seen: Observation) -> Figure:
    name = "poll lateness p50 / p95"
    if not seen.lateness:
        reason = (
            "the list is empty" if seen.lateness_present else "the workers keep no lateness samples"
        )
        return Figure(
            section,
            name,
            "n/a",
            "",
            "",
            f"{POLL_LATENESS_KEY} absent or empty ({reason}); "
            "lateness cannot be measured from the sandbox's side",
        )
    p50, p95 = percentile(seen.lateness, 0.5), percentile(seen.lateness, 0.95)
    # The list is pushed on the left: the first samples are the newest.
    tenth = max(1, len(seen.lateness) // 10)
    newest, oldest = seen.lateness[:tenth], seen.lateness[-tenth:]
    return Figure(
        section,
        name,
        f"{p50:.2f} s / {p95:.2f} s",
        "0 s",
        "",
        f"{len(seen.lateness)} samples from {POLL_LATENESS_KEY} (the newest, capped by the "
        f"workers), max {max(seen.lateness):.2f} s; p50 of the oldest tenth "
        f"{percentile(oldest, 0.5):.2f} s, of the newest tenth {percentile(newest, 0.5):.2f} s; "
        f"p50 of the newest {LATENESS_RECENT} every {RSS_SAMPLE_S:g} s: "
        + " ".join(f"{p50:.1f}" for _, p50 in seen.lateness_trend),
    )


def _cores() -> int:
    return os.cpu_count() or 1


# ------------------------------------------------------ 3. and 4. throughput


E2E_GENERATION_S = 5.0
OVERHEAD_POLL_INITIAL_S = 0.05
PIPELINE_TIMEOUT_S = 180.0
NOOP_TIMEOUT_S = 120.0
E2E_KEY = "pipeline, 5 s generation"
NAIVE_KEY = "naive, 5 s generation"
OVERHEAD_KEY = "pipeline, 0 s generation"


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
        wait_for_states(_redis(stack), batch.ids, (), PIPELINE_TIMEOUT_S)
        records = finished_records(batch.ids)
    finally:
        stack.stop(workers)
    run.upstream[label] = upstream_counts(control, jobs)
    succeeded = [r for r in records if r.state.value == "succeeded"]
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


def _naive_timeout(jobs: int, generation_s: float) -> float:
    """A generous bound for the naive worker: every job holds a slot for its whole run."""
    rounds = math.ceil(jobs / CONCURRENCY)
    per_job = (math.ceil(generation_s / naive.POLL_INTERVAL_S) + 1) * naive.POLL_INTERVAL_S
    return rounds * per_job * 2 + 30.0


def end_to_end_section(run: Run) -> list[Figure]:
    """Jobs/s of the pipeline against the naive worker, with a 5 s generation time."""
    jobs = run.plan.e2e_jobs
    section = "3 end to end"
    sandbox = run.stack.start_sandbox(["--generation-seconds", f"{E2E_GENERATION_S:g}"])
    control = SandboxControl(sandbox.url or "")
    try:
        pipeline = pipeline_throughput(
            run,
            sandbox,
            control,
            jobs=jobs,
            label=E2E_KEY,
            settings={"KIE_RATE_LIMIT": NO_RATE_LIMIT},
        )
        request = remix_request("bench naive")
        baseline = naive_throughput(
            run,
            sandbox,
            control,
            send=lambda: naive.remix.delay(request),
            jobs=jobs,
            timeout=_naive_timeout(jobs, E2E_GENERATION_S),
            label=NAIVE_KEY,
        )
    finally:
        control.close()
        run.stack.stop([sandbox])
    setup = f"{jobs} jobs, 1 worker x {CONCURRENCY}, {E2E_GENERATION_S:g} s generation"
    return [
        Figure(
            section,
            f"remixq pipeline ({setup})",
            f"{pipeline.rate:.2f} jobs/s",
            f"naive: {baseline.rate:.2f} jobs/s",
            ratio(pipeline.rate, baseline.rate),
            pipeline.note,
        ),
        Figure(
            section,
            "naive worker (createTask, then sleep 2 s + recordInfo)",
            f"{baseline.rate:.2f} jobs/s",
            "",
            "",
            baseline.note,
        ),
    ]


def overhead_section(run: Run) -> list[Figure]:
    """Jobs/s of the pipeline with instant generation against Celery no-op tasks/s."""
    jobs = run.plan.overhead_jobs
    section = "4 overhead"
    sandbox = run.stack.start_sandbox(["--generation-seconds", "0"])
    control = SandboxControl(sandbox.url or "")
    try:
        pipeline = pipeline_throughput(
            run,
            sandbox,
            control,
            jobs=jobs,
            label=OVERHEAD_KEY,
            settings={
                "KIE_RATE_LIMIT": NO_RATE_LIMIT,
                "REMIX_POLL_INITIAL_S": f"{OVERHEAD_POLL_INITIAL_S:g}",
            },
        )
        baseline = naive_throughput(
            run, sandbox, control, send=naive.noop.delay, jobs=jobs, timeout=NOOP_TIMEOUT_S
        )
    finally:
        control.close()
        run.stack.stop([sandbox])
    setup = f"{jobs} jobs, 1 worker x {CONCURRENCY}, 0 s generation"
    return [
        Figure(
            section,
            f"remixq pipeline ({setup})",
            f"{pipeline.rate:.1f} jobs/s",
            f"no-op: {baseline.rate:.1f} tasks/s",
            ratio(pipeline.rate, baseline.rate, percent=True),
            pipeline.note + f"; first poll after {OVERHEAD_POLL_INITIAL_S:g} s",
        ),
        Figure(
            section,
            f"Celery no-op task, same Redis ({jobs} tasks)",
            f"{baseline.rate:.1f} tasks/s",
            "",
            "",
            baseline.note,
        ),
    ]


# -------------------------------------------------------- 5. requests per job


def _per_job(counts: Upstream) -> tuple[float, float]:
    jobs = max(counts.jobs, 1)
    return counts.create_requests / jobs, counts.record_requests / jobs


def _per_job_text(counts: Upstream) -> str:
    create, record = _per_job(counts)
    return f"{create + record:.2f} ({create:.2f} create + {record:.2f} record)"


def requests_section(run: Run) -> list[Figure]:
    """Upstream requests per job (createTask + recordInfo), from sections 3 and 4."""
    section = "5 upstream requests"
    figures: list[Figure] = []
    e2e, naive_counts, overhead = (run.upstream.get(k) for k in (E2E_KEY, NAIVE_KEY, OVERHEAD_KEY))
    if e2e is not None:
        baseline = f"naive: {_per_job_text(naive_counts)}" if naive_counts else ""
        figures.append(
            Figure(
                section,
                f"per job, {E2E_KEY}",
                _per_job_text(e2e),
                baseline,
                ratio(sum(_per_job(e2e)), sum(_per_job(naive_counts))) if naive_counts else "",
                f"{e2e.create_requests} createTask + {e2e.record_requests} recordInfo "
                f"for {e2e.jobs} jobs",
            )
        )
    if overhead is not None:
        figures.append(
            Figure(
                section,
                f"per job, {OVERHEAD_KEY}",
                _per_job_text(overhead),
                "2.00 minimum (1 create + 1 record)",
                ratio(sum(_per_job(overhead)), 2.0),
                f"{overhead.create_requests} createTask + {overhead.record_requests} "
                f"recordInfo for {overhead.jobs} jobs",
            )
        )
    return figures


#: Every section by its ``--only`` name, in the order a full run takes them.
SECTIONS: dict[str, Section] = {
    "rate-limit": rate_limit_section,
    "in-flight": inflight_section,
    "end-to-end": end_to_end_section,
    "overhead": overhead_section,
    "requests": requests_section,
}
#: Sections whose measurements another section reports.
DEPENDS_ON: dict[str, tuple[str, ...]] = {"requests": ("end-to-end", "overhead")}
