"""Section 2: many jobs in flight on one worker: memory, polls served and poll lateness.

A job in flight costs the worker nothing but a member of the schedule: it is parked
until its next poll, and the dispatcher sends it in a ``remix.poll`` batch when it is
due. This section fills one worker with long generations and then watches whether the
polls the backoff asks for are served, and how late they start.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import redis

from bench.procfs import TreeUsage, cpu_seconds, tree_usage
from bench.report import Figure, ratio
from bench.sections.common import (
    CONCURRENCY,
    NO_RATE_LIMIT,
    Batch,
    Run,
    enqueue_jobs,
    job_records,
    job_states,
    job_store,
    percentile,
    private_redis,
    redis_memory,
    stop_started,
    wait_for_states,
)
from bench.stack import Stack
from sandbox.control import SandboxControl
from sandbox.launch import ManagedProcess
from worker import keys
from worker.fleet.dispatcher import POLL_BATCH_SIZE
from worker.models import FINISHED_STATES
from worker.policies.poll_schedule import poll_delay

SECTION = "2 in flight"
MB = 1_000_000
KB = 1_000
IN_FLIGHT_STATES = frozenset({"submitted", "running"})
INFLIGHT_GENERATION_S = 900
INFLIGHT_POLL_INITIAL_S = 2.0
INFLIGHT_POLL_MAX_S = 30.0
RSS_SAMPLE_S = 5.0
#: How many of the newest lateness samples make one point of the lateness trend.
LATENESS_RECENT = 500
POLL_TASK_MARK = "Task remix.poll["
SUCCEEDED_MARK = "] succeeded in "


def scheduled_polls(submitted_at: Iterable[float], start: float, end: float) -> int:
    """Polls the backoff schedule asks for between ``start`` and ``end`` (unix times).

    Each job polls at ``submitted_at + d1 + ... + dk``, ``dk`` being the pipeline's own
    :func:`~worker.policies.poll_schedule.poll_delay`, as if every poll ran on time: the
    first poll is parked ``REMIX_POLL_INITIAL_S`` after the acceptance (``d1``), and each poll parks
    the job for the next delay of the backoff.
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
    #: Jobs not finished at the end, and how many of them were members of the schedule.
    unfinished: int = 0
    in_schedule: int = 0
    rss_end: int = 0
    rss_peak: int = 0
    processes: int = 0
    cpu_seconds: float = 0.0
    main_cpu_seconds: float = 0.0
    polls: int = 0
    poll_tasks: int = 0
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


@dataclass(frozen=True)
class Fill:
    """The jobs enqueued, the worker idle before them and the filling that followed."""

    batch: Batch
    idle: TreeUsage
    redis_idle: int
    counts: Counter[str]
    filled: bool
    seconds: float


def _cpu_of(process: ManagedProcess | None) -> float:
    return 0.0 if process is None else tree_usage(process.popen.pid).cpu_seconds


def _floats(raws: Iterable[bytes | str]) -> list[float]:
    """The samples of the lateness list that parse as numbers."""
    values = []
    for raw in raws:
        try:
            values.append(float(raw))
        except ValueError:
            continue
    return values


def _recent_lateness(client: redis.Redis) -> float | None:
    """p50 of the newest lateness samples, or None when there are none."""
    values = _floats(client.lrange(keys.POLL_LATENESS, 0, LATENESS_RECENT - 1))
    return percentile(values, 0.5) if values else None


def _poll_tasks_logged(worker: ManagedProcess, offset: int) -> int:
    """``remix.poll`` tasks that succeeded in the worker's log after ``offset``."""
    if worker.log_path is None:
        return 0
    with worker.log_path.open("rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    return sum(1 for line in text.splitlines() if POLL_TASK_MARK in line and SUCCEEDED_MARK in line)


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
    client = private_redis(stack)
    client.delete(keys.POLL_LATENESS)
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
    result.poll_tasks = _poll_tasks_logged(worker, offset)
    result.lateness_present = bool(client.exists(keys.POLL_LATENESS))
    if result.lateness_present:
        result.lateness = _floats(client.lrange(keys.POLL_LATENESS, 0, -1))
    _read_jobs(result, ids, window_start)
    return result


def _read_jobs(result: Observation, ids: Sequence[str], window_start: float) -> None:
    """The jobs' side at the end of the window: in flight, scheduled, polls asked for."""
    result.in_schedule = job_store().schedule_size()
    states = job_states(ids)
    result.unfinished = sum(1 for state in states.values() if state not in FINISHED_STATES)
    in_flight = [job_id for job_id, state in states.items() if state in IN_FLIGHT_STATES]
    result.in_flight = len(in_flight)
    submitted = (r.submitted_at for r in job_records(in_flight))
    result.scheduled = scheduled_polls(
        (t for t in submitted if t is not None), window_start, window_start + result.seconds
    )


def inflight_section(run: Run) -> list[Figure]:
    """Many jobs in flight on one worker: memory, polls served and poll lateness."""
    stack, plan = run.stack, run.plan
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
        fill = _fill(stack, worker, plan.inflight_jobs, plan.inflight_fill_timeout_s)
        seen = observe(stack, control, worker, sandbox, fill.batch.ids, plan.inflight_observe_s)
        redis_loaded = redis_memory(private_redis(stack))
    finally:
        control.close()
        stop_started(stack, [worker, sandbox])
    return _figures(fill, seen, redis_loaded)


def _fill(stack: Stack, worker: ManagedProcess, jobs: int, timeout: float) -> Fill:
    """Enqueue ``jobs`` jobs and wait until they are accepted upstream (or ``timeout``)."""
    idle = tree_usage(worker.popen.pid)
    redis_idle = redis_memory(private_redis(stack))
    batch = enqueue_jobs(jobs, "bench in flight")
    counts, filled = wait_for_states(batch.ids, IN_FLIGHT_STATES, timeout)
    return Fill(batch, idle, redis_idle, counts, filled, time.time() - batch.started)


def _figures(fill: Fill, seen: Observation, redis_loaded: int) -> list[Figure]:
    jobs = len(fill.batch.ids)
    submitted = sum(fill.counts[s] for s in IN_FLIGHT_STATES)
    fill_note = (
        f"all {jobs} accepted upstream {fill.seconds:.0f} s after the first enqueue"
        if fill.filled
        else f"only {submitted} of {jobs} accepted after {fill.seconds:.0f} s "
        f"({dict(fill.counts)}); observed anyway"
    )
    needed = seen.scheduled / seen.seconds
    polls_per_s = seen.polls / seen.seconds
    idle_rss = fill.idle.rss_bytes
    return [
        Figure(
            SECTION,
            "producer: enqueue rate",
            f"{fill.batch.rate:.0f} jobs/s",
            "",
            "",
            f"{jobs} jobs through enqueue_remix, one at a time",
        ),
        Figure(
            SECTION,
            "fill: jobs accepted upstream/s",
            f"{submitted / fill.seconds:.0f} jobs/s",
            "",
            "",
            fill_note,
        ),
        Figure(
            SECTION,
            "jobs in flight (observed)",
            f"{seen.in_flight}",
            f"{jobs} enqueued",
            ratio(seen.in_flight, jobs, percent=True),
            f"observed for {seen.seconds:.0f} s once the fill ended; at the end "
            f"{seen.in_schedule} of the {seen.unfinished} unfinished jobs were in the schedule",
        ),
        Figure(
            SECTION,
            "worker RSS, main + pool",
            f"{seen.rss_end / MB:.0f} MB",
            f"{idle_rss / MB:.0f} MB idle",
            ratio(seen.rss_end, idle_rss),
            f"peak {seen.rss_peak / MB:.0f} MB over {seen.processes} processes; "
            f"{(seen.rss_end - idle_rss) / max(seen.in_flight, 1) / KB:.1f} kB "
            "per job in flight",
        ),
        Figure(
            SECTION,
            "Redis used memory",
            f"{redis_loaded / MB:.0f} MB",
            f"{fill.redis_idle / MB:.1f} MB idle",
            "",
            f"{(redis_loaded - fill.redis_idle) / max(jobs, 1) / KB:.1f} kB per job",
        ),
        Figure(
            SECTION,
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
            SECTION,
            "mean time between polls of a job",
            f"{seen.in_flight / polls_per_s:.0f} s" if polls_per_s else "never",
            f"{INFLIGHT_POLL_MAX_S:g} s (REMIX_POLL_MAX_S)",
            ratio(seen.in_flight / polls_per_s, INFLIGHT_POLL_MAX_S) if polls_per_s else "",
        ),
        Figure(
            SECTION,
            "poll tasks run/s (worker log)",
            f"{seen.poll_tasks / seen.seconds:.1f}/s",
            f"{polls_per_s:.1f}/s with a request",
            ratio(seen.poll_tasks, seen.polls) if seen.polls else "",
            f"one remix.poll task carries the jobs the dispatcher found due together, "
            f"at most {POLL_BATCH_SIZE}",
        ),
        Figure(
            SECTION,
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
        _lateness_figure(seen),
    ]


def _lateness_figure(seen: Observation) -> Figure:
    name = "poll lateness p50 / p95"
    if not seen.lateness:
        reason = (
            "the list is empty" if seen.lateness_present else "the workers keep no lateness samples"
        )
        return Figure(
            SECTION,
            name,
            "n/a",
            "",
            "",
            f"{keys.POLL_LATENESS} absent or empty ({reason}); "
            "lateness cannot be measured from the sandbox's side",
        )
    p50, p95 = percentile(seen.lateness, 0.5), percentile(seen.lateness, 0.95)
    # The list is pushed on the left: the first samples are the newest.
    tenth = max(1, len(seen.lateness) // 10)
    newest, oldest = seen.lateness[:tenth], seen.lateness[-tenth:]
    return Figure(
        SECTION,
        name,
        f"{p50:.2f} s / {p95:.2f} s",
        "0 s",
        "",
        f"{len(seen.lateness)} samples from {keys.POLL_LATENESS} (the newest, capped by the "
        f"workers): how long after its due time in the schedule each poll started; "
        f"max {max(seen.lateness):.2f} s; p50 of the oldest tenth "
        f"{percentile(oldest, 0.5):.2f} s, of the newest tenth {percentile(newest, 0.5):.2f} s; "
        f"p50 of the newest {LATENESS_RECENT} every {RSS_SAMPLE_S:g} s: "
        + " ".join(f"{p50:.1f}" for _, p50 in seen.lateness_trend),
    )


def _cores() -> int:
    return os.cpu_count() or 1
