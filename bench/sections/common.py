"""What the sections share: the run's sizes and state, and the helpers to enqueue and wait.

Every figure comes from this run: upstream counts from the sandbox's
``/_sandbox/stats``, job outcomes from the job records (read through the pipeline's own
:class:`~worker.store.jobs.JobStore`, so the benchmark never depends on how a record is
stored), memory and CPU from ``/proc``. Every wait is bounded; a bound that runs out is
reported in a note instead of hanging the run.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
import requests
from celery import Celery

from bench import naive
from bench.procfs import tree_usage
from bench.report import Figure
from bench.stack import Stack
from producers import enqueue_remix
from producers.http.callbacks import CALLBACK_PATH
from sandbox.control import SandboxControl
from sandbox.launch import LOOPBACK, ManagedProcess, free_port
from worker.app import services
from worker.models import FINISHED_STATES, JobRecord, JobState
from worker.store.jobs import JobStore

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
RECORD_TIMEOUT_S = 10.0
MS_PER_S = 1000


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
    #: Jobs of the callback latency section, and how many generations end per second.
    callback_jobs: int
    callback_pace: float
    #: Jobs of each run (callbacks, polling only) of the upstream requests section.
    callback_requests_jobs: int
    #: Jobs enqueued each way (HTTP, in-process) by the HTTP enqueue section.
    http_jobs: int

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls((1, 6), 20.0, 5.0, 1000, 120.0, 30.0, 20, 200, 300, 25.0, 100, 500)
        return cls((1, 3, 6), 40.0, 5.0, 10000, 300.0, 75.0, 40, 1000, 1000, 25.0, 200, 2000)


@dataclass(frozen=True)
class Upstream:
    """Requests one batch of jobs made upstream."""

    jobs: int
    create_requests: int
    record_requests: int

    def per_job(self) -> tuple[float, float]:
        """createTask and recordInfo requests per job."""
        jobs = max(self.jobs, 1)
        return self.create_requests / jobs, self.record_requests / jobs

    @property
    def total_per_job(self) -> float:
        return sum(self.per_job())

    def per_job_text(self) -> str:
        """``3.00 (1.00 create + 2.00 record)``."""
        create, record = self.per_job()
        return f"{create + record:.2f} ({create:.2f} create + {record:.2f} record)"


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
    return enqueue_prompts([prompt] * count)


def enqueue_prompts(prompts: Sequence[str], pace: float | None = None) -> Batch:
    """Enqueue one job per prompt through the public producer API, one after the other.

    :param pace: jobs per second at most (the ``i``-th goes in ``i / pace`` s after the
        first); as fast as the producer goes when None.
    """
    started, began = time.time(), time.monotonic()
    ids = []
    for index, prompt in enumerate(prompts):
        if pace is not None:
            time.sleep(max(0.0, began + index / pace - time.monotonic()))
        ids.append(
            enqueue_remix(
                prompt=prompt, image_url=SOURCE_IMAGE, reference_image_urls=[REFERENCE_IMAGE]
            )
        )
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


@dataclass(frozen=True)
class PipelineRun:
    """Jobs one pipeline worker worked off: the batch, the finished records, the counters.

    :param batch: the jobs enqueued.
    :param records: the records of those that finished.
    :param upstream: the sandbox's createTask and recordInfo counts for the batch.
    :param stats: the sandbox's counters (``/_sandbox/stats``) at the end.
    :param watched_cpu: CPU seconds of the process asked to be watched (0 for none).
    """

    batch: Batch
    records: list[JobRecord]
    upstream: Upstream
    stats: dict[str, Any]
    watched_cpu: float = 0.0


def run_pipeline(
    run: Run,
    sandbox: ManagedProcess,
    control: SandboxControl,
    *,
    prompts: Sequence[str],
    settings: dict[str, str],
    timeout: float = PIPELINE_TIMEOUT_S,
    pace: float | None = None,
    watch: ManagedProcess | None = None,
) -> PipelineRun:
    """One pipeline worker (concurrency 2) works off one job per prompt, from a fresh
    Redis and a fresh sandbox; returns once every job finished (or ``timeout`` after the
    last enqueue).

    :param pace: enqueue at most this many jobs per second (as fast as possible: None).
    :param watch: a process whose CPU time from the first enqueue to the end is kept.
    """
    stack = run.stack
    stack.flush()
    control.reset()
    workers = stack.start_workers(sandbox, 1, concurrency=CONCURRENCY, settings=settings)
    cpu = 0.0 if watch is None else tree_usage(watch.popen.pid).cpu_seconds
    try:
        batch = enqueue_prompts(prompts, pace)
        wait_for_states(batch.ids, (), timeout)
        records = finished_records(batch.ids)
        if watch is not None:
            cpu = tree_usage(watch.popen.pid).cpu_seconds - cpu
    finally:
        stack.stop(workers)
    stats = control.stats()
    upstream = Upstream(len(prompts), int(stats["create_requests"]), int(stats["record_requests"]))
    return PipelineRun(batch, records, upstream, stats, cpu)


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
    done = run_pipeline(run, sandbox, control, prompts=[f"bench {label}"] * jobs, settings=settings)
    run.upstream[label] = done.upstream
    succeeded = [r for r in done.records if r.state is JobState.SUCCEEDED]
    if not succeeded:
        return Throughput(0, jobs, 0.0)
    last = max(r.finished_at or 0.0 for r in succeeded)
    latencies = tuple((r.finished_at or 0.0) - r.created_at for r in succeeded)
    return Throughput(len(succeeded), jobs, last - done.batch.started, latencies)


def naive_throughput(
    run: Run,
    sandbox: ManagedProcess,
    control: SandboxControl,
    *,
    send: Callable[[], Any],
    jobs: int,
    timeout: float,
    label: str | None = None,
    settings: dict[str, str] | None = None,
) -> Throughput:
    """One naive worker (concurrency 2) runs ``jobs`` tasks sent by ``send``."""
    stack = run.stack
    stack.flush()
    control.reset()
    workers = stack.start_workers(
        sandbox, 1, concurrency=CONCURRENCY, settings=settings or {}, naive=True
    )
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


# ------------------------------------------------------------- upstream callbacks (6 and 7)


@dataclass(frozen=True)
class CallbackUpstream:
    """A sandbox that signs its callbacks and the HTTP app that receives them.

    :param sandbox: the sandbox, signing callbacks with the stack's webhook key.
    :param control: its control client.
    :param api: ``uvicorn producers.http:app``, the ``callBackUrl`` of every task.
    :param settings: a worker's settings with callbacks on (no rate limit).
    """

    sandbox: ManagedProcess
    control: SandboxControl
    api: ManagedProcess
    settings: dict[str, str]


@contextmanager
def callback_upstream(
    stack: Stack, generation_s: float, settings: Mapping[str, str] | None = None
) -> Iterator[CallbackUpstream]:
    """Start a sandbox that calls back, signed, and the HTTP app it calls; stop both after.

    The webhook key reaches the sandbox over its control endpoint (a command-line argument
    would show in ``ps``). The workers and the app get ``KIE_CALLBACK_URL`` (the app's
    callback route) and ``KIE_WEBHOOK_HMAC_KEY``; the app also gets the upstream's URL and
    key, with which it confirms an adopted task.

    :param generation_s: the sandbox's generation time (a prompt may ask for another).
    :param settings: further settings of the workers and the app.
    """
    sandbox: ManagedProcess | None = None
    api: ManagedProcess | None = None
    control: SandboxControl | None = None
    try:
        sandbox = stack.start_sandbox(["--generation-seconds", f"{generation_s:g}"])
        control = SandboxControl(sandbox.url or "")
        control.configure(webhook_hmac_key=stack.webhook_key)
        port = free_port()
        callback_settings = {
            "KIE_RATE_LIMIT": NO_RATE_LIMIT,
            "KIE_CALLBACK_URL": f"http://{LOOPBACK}:{port}{CALLBACK_PATH}",
            "KIE_WEBHOOK_HMAC_KEY": stack.webhook_key,
            **(settings or {}),
        }
        api = stack.start_api(sandbox, callback_settings, port)
        yield CallbackUpstream(sandbox, control, api, callback_settings)
    finally:
        if control is not None:
            control.close()
        stop_started(stack, [api, sandbox])


def completion_times(
    sandbox: ManagedProcess, api_key: str, task_ids: Iterable[str]
) -> dict[str, float]:
    """When each upstream task's generation ended, by the sandbox: recordInfo's
    ``completeTime`` (unix milliseconds, truncated), in unix seconds.

    These requests count in the sandbox's ``record_requests``: read its counters first.
    Tasks the sandbox does not know, or that have not ended, are left out.
    """
    ends: dict[str, float] = {}
    with requests.Session() as session:
        session.trust_env = False
        session.headers["Authorization"] = f"Bearer {api_key}"
        url = f"{sandbox.url}{naive.RECORD_INFO_PATH}"
        for task_id in task_ids:
            response = session.get(url, params={"taskId": task_id}, timeout=RECORD_TIMEOUT_S)
            data = response.json().get("data") if response.ok else None
            complete = data.get("completeTime") if isinstance(data, dict) else None
            if isinstance(complete, int):
                ends[task_id] = complete / MS_PER_S
    return ends


@dataclass(frozen=True)
class FinishDelays:
    """Seconds from each job's generation end upstream to its record's ``finished_at``.

    The generation end is the sandbox's (``time.time()`` in its process, truncated to
    the millisecond, so a delay reads up to 1 ms long); ``finished_at`` is the Redis
    server's clock (``TIME``), read by the script that stores the final state. Both are
    this machine's real-time clock.

    :param delays: of each job that succeeded, in the order of its generation end.
    :param ends: the generation ends, in the same order (unix seconds).
    :param polled: of those jobs, how many were polled (recordInfo) at least once.
    :param missing: jobs left out: unfinished, failed, or without a known generation end.
    """

    delays: list[float]
    ends: list[float]
    polled: int
    missing: int

    @property
    def count(self) -> int:
        return len(self.delays)

    def p(self, share: float) -> float:
        return percentile(self.delays, share) if self.delays else math.nan

    def text(self) -> str:
        """``12 ms / 48 ms``: p50 / p99 in milliseconds."""
        return f"{_ms(self.p(0.5))} / {_ms(self.p(0.99))}"

    def spread(self) -> str:
        """How the generation ends were spread: over how long, how many a second."""
        if len(self.ends) < 2:
            return "one generation end"
        span = self.ends[-1] - self.ends[0]
        if span <= 0:
            return "every generation ended at once"
        gaps = [later - earlier for earlier, later in zip(self.ends, self.ends[1:], strict=False)]
        return (
            f"generation ends spread over {span:.1f} s ({(len(self.ends) - 1) / span:.1f}/s, "
            f"largest gap {max(gaps) * 1000:.0f} ms)"
        )

    def note(self) -> str:
        if not self.delays:
            return f"no job to measure ({self.missing} left out)"
        text = (
            f"{self.count} jobs: p50 {_ms(self.p(0.5))}, p90 {_ms(self.p(0.9))}, "
            f"p99 {_ms(self.p(0.99))}, max {_ms(max(self.delays))}"
        )
        if self.polled:
            text += f"; {self.polled} of them polled at least once"
        if self.missing:
            text += f"; {self.missing} jobs left out (unfinished, failed or end unknown)"
        return text


def finish_delays(records: Sequence[JobRecord], ends: dict[str, float], total: int) -> FinishDelays:
    """The delays of the records that succeeded and whose task's end is known.

    :param records: finished records.
    :param ends: generation end by upstream task id (:func:`completion_times`).
    :param total: jobs enqueued (those without a usable record count as missing).
    """
    pairs: list[tuple[float, JobRecord]] = []
    for record in records:
        end = ends.get(record.upstream_task_id or "")
        if record.state is JobState.SUCCEEDED and record.finished_at is not None and end:
            pairs.append((end, record))
    pairs.sort(key=lambda pair: pair[0])
    delays = [(record.finished_at or 0.0) - end for end, record in pairs]
    polled = sum(1 for _, record in pairs if record.polls > 0)
    return FinishDelays(delays, [end for end, _ in pairs], polled, total - len(pairs))


def finish_delays_of(stack: Stack, sandbox: ManagedProcess, done: PipelineRun) -> FinishDelays:
    """The finish delays of a run's jobs, asking the sandbox when their tasks ended.

    Call it after ``done`` read the sandbox's counters and before the sandbox is reset.
    """
    task_ids = [r.upstream_task_id for r in done.records if r.upstream_task_id]
    ends = completion_times(sandbox, stack.api_key, task_ids)
    return finish_delays(done.records, ends, done.upstream.jobs)


def _ms(seconds: float) -> str:
    """``0.0123`` -> ``12 ms``; ``2.5`` -> ``2.50 s``."""
    if math.isnan(seconds):
        return "n/a"
    if abs(seconds) >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.0f} ms"
