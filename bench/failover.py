"""The failover scenario of the chaos suite: the Redis primary is SIGKILLed under load and
Sentinel promotes its replica.

Every Redis role (broker, result backend, job store) is one Sentinel group
(:class:`sandbox.redis_group.RedisGroup`: a primary, one replica, three sentinels, each
with a password), given to the workers as a ``sentinel://`` URL read from a file
(``REDIS_URL_FILE``, ``REDIS_SENTINEL_PASSWORD_FILE``). Jobs are enqueued over a stretch
of time; halfway the primary is SIGKILLed, the sentinels promote the replica, and the old
primary is started again (empty), to come back as a replica of the new one.

It measures: every job succeeded, none lost, none paid twice without the record's
``possibly_paid_twice``, no secret in a log or in Redis; how long the promotion took and
how long until every job moved again after it; what the asynchronous replication lost
(records the new primary holds older than they were just before the kill, bytes of the
replication stream, upstream tasks no record knows); and how many workers left their
jobs to the lease because the job store's run id changed. See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.chaos import (
    FAILOVER,
    REFERENCE_IMAGE,
    SAMPLE_S,
    SOURCE_IMAGE,
    WORKER_SETTINGS,
    Outcome,
    Watcher,
    _dump,
    _fragments,
    _produce,
    _signature,
    start_named_worker,
    wait_for_all,
)
from sandbox.control import SandboxControl
from sandbox.launch import ManagedProcess, start_api, start_sandbox
from sandbox.redis_group import RedisGroup
from worker.models import JobRecord, JobState
from worker.redis_urls import SentinelOptions
from worker.store.connection import connect
from worker.store.jobs import JobStore

GENERATION_S = 2.0
INPUT = {"image_url": SOURCE_IMAGE, "reference_image_urls": [REFERENCE_IMAGE]}
#: What a worker logs when it leaves its jobs to their lease after the job store changed.
LEASE_NOTICE = "the job store restarted or failed over"
PROMOTION_TIMEOUT_S = 60.0
HEALTH_POLL_S = 0.25
#: What ``make chaos`` sets ``REMIX_ACCEPT_WAIT_MS`` to in its second run.
ACCEPT_WAIT_MS = 100
#: ``make chaos`` enqueues its jobs over this long; the primary is killed halfway.
STRETCH_S = 60.0
_STATE_RANK = {JobState.QUEUED: 0, JobState.SUBMITTED: 1, JobState.RUNNING: 2}


@dataclass
class FailoverOutcome(Outcome):
    """What one failover run measured (seconds are -1 when the thing never happened)."""

    #: Upstream tasks the sandbox accepted that no record names: acceptances the failover lost.
    orphaned_tasks: int = 0
    in_flight_at_kill: int = 0
    promotion_s: float = -1.0
    moved_again_s: float = -1.0
    #: The jobs that moved again last after the promotion (for a look at their logs).
    last_to_move: list[str] = field(default_factory=list)
    #: Records the new primary holds older than they were just before the kill.
    records_behind: int = 0
    #: Bytes of the replication stream the old primary had and the promoted replica never got.
    replication_bytes_lost: int = 0
    rejoined_s: float = -1.0
    #: How long the HTTP app's /healthz did not answer 200 after the kill.
    healthz_degraded_s: float = 0.0
    #: Workers that logged leaving their jobs to the lease (the job store's run id changed).
    lease_notices: int = 0
    accept_wait_ms: int = 0
    #: Median round trip of recording an acceptance, without and with ``WAIT``, in ms.
    accept_ms: tuple[float, float] = (0.0, 0.0)

    @property
    def ok(self) -> bool:
        return super().ok and self.moved_again_s >= 0 and self.rejoined_s >= 0


class FailoverFleet:
    """A Sentinel group, the sandbox and workers; :meth:`close` stops everything started."""

    def __init__(
        self, log_dir: Path, workers: int, concurrency: int, settings: dict[str, str]
    ) -> None:
        self.log_dir = log_dir
        # Random hex only: a word of a log line that is part of a secret would be redacted.
        self.api_key = f"sk-{uuid.uuid4().hex}"
        self.password = uuid.uuid4().hex
        self.sentinel_password = uuid.uuid4().hex
        self.concurrency = concurrency
        self.settings = settings
        self.workers: list[ManagedProcess] = []
        self.sandbox: ManagedProcess | None = None
        self.api: ManagedProcess | None = None
        self.group = RedisGroup(
            log_dir / "redis", password=self.password, sentinel_password=self.sentinel_password
        )
        try:
            self._start(workers)
        except BaseException:
            self.close()
            raise
        self.control = SandboxControl(self.sandbox.url if self.sandbox else "")

    def _start(self, workers: int) -> None:
        self.group.start()
        self.url_file = self.log_dir / "redis-url"
        self.url_file.write_text(self.group.url() + "\n")
        self.sentinel_password_file = self.log_dir / "sentinel-password"
        self.sentinel_password_file.write_text(self.sentinel_password + "\n")
        self.sandbox = start_sandbox(
            args=["--api-key", self.api_key, "--generation-seconds", str(GENERATION_S)],
            log_path=self.log_dir / "sandbox.log",
        )
        for _ in range(workers):
            self.start_worker()
        self.api = start_api(self._redis_env(), log_path=self.log_dir / "api.log")

    def _redis_env(self) -> dict[str, str | None]:
        return {
            "REDIS_URL": None,
            "RESULT_BACKEND_URL": None,
            "REDIS_URL_FILE": str(self.url_file),
            "REDIS_SENTINEL_PASSWORD_FILE": str(self.sentinel_password_file),
        }

    def start_worker(self) -> ManagedProcess:
        env: dict[str, str | None] = {
            **self._redis_env(),
            "KIE_API_KEY": self.api_key,
            "KIE_BASE_URL": self.sandbox.url if self.sandbox else "",
            **self.settings,
        }
        process = start_named_worker(self.log_dir, FAILOVER, self.concurrency, env)
        self.workers.append(process)
        return process

    def secrets(self) -> list[str]:
        return [self.api_key, self.password, self.sentinel_password]

    def logs(self) -> list[Path]:
        """The logs of the workers and the HTTP app."""
        processes = [*self.workers, *([self.api] if self.api else [])]
        return [path for process in processes if (path := process.log_path) is not None]

    def close(self) -> None:
        for process in [*self.workers, self.sandbox, self.api]:
            if process is not None:
                process.stop()
        with contextlib.suppress(AttributeError):
            self.control.close()
        self.group.close()


class HealthWatch:
    """Asks the HTTP app's ``/healthz`` every :data:`HEALTH_POLL_S`, as a load balancer
    would; remembers when it did not answer 200."""

    def __init__(self, base_url: str) -> None:
        self.url = f"{base_url}/healthz"
        self.failures: list[float] = []
        self.checks = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(HEALTH_POLL_S):
            asked = time.monotonic()
            self.checks += 1
            try:
                with urllib.request.urlopen(self.url, timeout=5) as answer:
                    status = answer.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError:
                status = 0
            if status != 200:
                self.failures.append(asked)

    def degraded_s(self, since: float) -> float:
        """From the first answer other than 200 after ``since`` to the last one (0: none)."""
        failed = [moment for moment in self.failures if moment >= since]
        return failed[-1] - failed[0] + HEALTH_POLL_S if failed else 0.0

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(10)


def run_failover(
    jobs: int,
    log_dir: Path,
    *,
    workers: int = 2,
    concurrency: int = 2,
    stretch_s: float = 30.0,
    settings: dict[str, str] | None = None,
    timeout_s: float = 600.0,
) -> FailoverOutcome:
    """Run ``jobs`` jobs, enqueued over ``stretch_s``, through a fleet whose Redis primary is
    SIGKILLed halfway; returns what it measured."""
    from worker.app import configure

    merged = {**WORKER_SETTINGS, **(settings or {})}
    fleet = FailoverFleet(log_dir, workers, concurrency, merged)
    wait_ms = int(merged.get("REMIX_ACCEPT_WAIT_MS", 0))
    outcome = FailoverOutcome(FAILOVER, jobs, accept_wait_ms=wait_ms)
    try:
        configure(
            redis_url=fleet.group.url(),
            redis_sentinel_password=fleet.sentinel_password,
            kie_callback_url=None,
        )
        fleet.control.configure(generation_seconds=GENERATION_S)
        prompts = [f"failover {i} {uuid.uuid4().hex[:8]}" for i in range(jobs)]
        job_ids: list[str] = []
        started = time.monotonic()
        producer = threading.Thread(
            target=_produce, args=(prompts, job_ids, stretch_s), daemon=True
        )
        producer.start()
        watcher = Watcher(fleet.group.url(), job_ids)
        health = HealthWatch(fleet.api.url if fleet.api and fleet.api.url else "")
        lease = float(merged["KIE_REQUEST_DEADLINE_S"]) + 15
        killed_at = _fail_over(fleet, watcher, outcome, started + stretch_s / 2, lease)
        health.stop()
        outcome.healthz_degraded_s = health.degraded_s(killed_at)
        outcome.seconds = wait_for_all(producer, watcher, jobs, started, timeout_s)
        _judge(fleet, watcher, prompts, outcome)
        outcome.accept_ms = _accept_cost(fleet)
    finally:
        configure()
        fleet.close()
    return outcome


def _fail_over(
    fleet: FailoverFleet, watcher: Watcher, outcome: FailoverOutcome, at: float, lease: float
) -> float:
    """SIGKILL the primary at ``at``; measure the promotion, the loss and the recovery.
    Returns the moment of the kill."""
    while time.monotonic() < at:
        time.sleep(SAMPLE_S)
        watcher.sample()
    group = fleet.group
    old = group.primary_port()
    [replica] = [port for port in group.servers if port != old]
    before = dict(watcher.sample())
    primary_offset = _offset(group, old, "master_repl_offset")
    killed_at = time.monotonic()
    group.kill(old)
    outcome.in_flight_at_kill = sum(1 for r in before.values() if r is not None and not r.finished)
    new = group.wait_for_new_primary(old, PROMOTION_TIMEOUT_S)
    promoted_at = time.monotonic()
    outcome.promotion_s = promoted_at - killed_at
    kept = _offset(group, new, "second_repl_offset") - 1
    outcome.replication_bytes_lost = max(0, primary_offset - kept) if new == replica else -1
    after = watcher.sample()
    outcome.records_behind = sum(1 for j, r in before.items() if _behind(r, after.get(j)))
    # As a careful deployment restarts a primary that lost its data: as a replica of the
    # primary the sentinels name (an empty primary on the old address would take writes
    # from clients that looked it up just before the promotion, and drop them when the
    # sentinels convert it).
    group.restart(old, replica_of=new)
    rejoin = threading.Thread(target=_rejoin, args=(group, old, new, outcome, promoted_at, lease))
    rejoin.start()
    moved = _moves(watcher, promoted_at, lease * 3)
    outcome.moved_again_s = -1.0 if -1.0 in moved.values() else max(moved.values(), default=0.0)
    outcome.last_to_move = sorted(moved, key=moved.__getitem__)[-3:]
    rejoin.join()
    return killed_at


def _moves(watcher: Watcher, since: float, deadline_s: float) -> dict[str, float]:
    """Seconds from ``since`` until each job unfinished then changed its record (or
    finished); a job that did not within ``deadline_s`` is kept in ``watcher.stuck``."""
    waiting = dict(watcher.signatures())
    moved: dict[str, float] = {}
    while waiting and time.monotonic() - since < deadline_s:
        time.sleep(SAMPLE_S / 2)
        now = watcher.sample()
        for job_id in [j for j, seen in waiting.items() if _signature(now.get(j)) != seen]:
            moved[job_id] = time.monotonic() - since
            del waiting[job_id]
    if waiting:
        watcher.stuck.update({job_id: {"unmoved": seen} for job_id, seen in waiting.items()})
        return {**moved, **dict.fromkeys(waiting, -1.0)}
    return moved


def _rejoin(
    group: RedisGroup, old: int, new: int, outcome: FailoverOutcome, since: float, lease: float
) -> None:
    """Note when the restarted old primary replicates the new one."""
    with contextlib.suppress(TimeoutError):
        group.wait_until_replica(old, new, timeout=lease * 2)
        outcome.rejoined_s = time.monotonic() - since


def run_both(jobs: int, log_dir: Path, workers: int, concurrency: int) -> list[FailoverOutcome]:
    """The scenario without and with the acknowledged acceptance (``REMIX_ACCEPT_WAIT_MS``)."""
    outcomes = []
    for wait_ms in (0, ACCEPT_WAIT_MS):
        run_dir = log_dir / f"wait-{wait_ms}"
        run_dir.mkdir()
        outcomes.append(
            run_failover(
                jobs,
                run_dir,
                workers=workers,
                concurrency=concurrency,
                stretch_s=STRETCH_S,
                settings={"REMIX_ACCEPT_WAIT_MS": str(wait_ms)},
            )
        )
        print(f"chaos: failover (wait {wait_ms} ms) done in {outcomes[-1].seconds:.0f} s")
    return outcomes


def _accept_cost(fleet: FailoverFleet, rounds: int = 500) -> tuple[float, float]:
    """The median round trip of recording one acceptance, plain and with ``WAIT``."""
    options = SentinelOptions(fleet.group.master, fleet.sentinel_password)
    store = JobStore(connect(fleet.group.url(), options), ttl_s=3600)
    job_id = uuid.uuid4().hex
    store.create(job_id, {"prompt": "accept cost", **INPUT}, due_in=3600.0)
    timings: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for waited, series in enumerate(timings):
            began = time.perf_counter()
            if waited:
                store.accept_replicated(job_id, "", "cost", 3600.0, ACCEPT_WAIT_MS)
            else:
                store.accept(job_id, "", "cost", 3600.0)
            series.append((time.perf_counter() - began) * 1000)
    store.redis.close()
    return statistics.median(timings[0]), statistics.median(timings[1])


def _offset(group: RedisGroup, port: int, name: str) -> int:
    with group.client(port) as client:
        return int(client.info("replication").get(name, 0))


def _behind(before: JobRecord | None, after: JobRecord | None) -> bool:
    """Whether a record is older than it was (a write the failover lost)."""
    if before is None:
        return False
    if after is None:
        return True
    return any(now < then for now, then in zip(_progress(after), _progress(before), strict=True))


def _progress(record: JobRecord) -> tuple[int, ...]:
    rank = _STATE_RANK.get(record.state, 3)
    return (rank, record.submit_attempts, record.polls, int(record.upstream_task_id is not None))


def _judge(
    fleet: FailoverFleet, watcher: Watcher, prompts: list[str], outcome: FailoverOutcome
) -> None:
    records = watcher.sample()
    accepted = fleet.control.stats()["accepted_by_prompt"]
    for prompt, job_id in zip(prompts, watcher.job_ids, strict=True):
        record = records.get(job_id)
        if record is None or not record.finished:
            outcome.lost += 1
        if record is None:
            continue
        outcome.states[record.state.value] += 1
        charged = int(accepted.get(prompt, 0))
        known = int(record.upstream_task_id is not None) + len(record.extra_task_ids)
        outcome.orphaned_tasks += max(0, charged - known)
        outcome.unknown_outcomes += record.unknown_outcomes
        outcome.flagged_possibly_twice += int(record.possibly_paid_twice)
        if charged > 1:
            outcome.accepted_twice += 1
            outcome.paid_twice_unflagged += int(not record.possibly_paid_twice)
    logs = [p.read_text(errors="replace") for w in fleet.workers if (p := w.log_path)]
    outcome.lease_notices = sum(1 for text in logs if LEASE_NOTICE in text)
    outcome.leaks = _leaks(fleet)
    outcome.stuck = watcher.stuck


def _leaks(fleet: FailoverFleet) -> list[str]:
    """Every place that holds a fragment of a secret: the workers' logs, Redis keys and values."""
    parts = [part for secret in fleet.secrets() for part in _fragments(secret)]
    found = [str(path) for path in fleet.logs() if any(part in path.read_bytes() for part in parts)]
    api_key = _fragments(fleet.api_key)
    with fleet.group.client(fleet.group.primary_port()) as client:
        for key in client.scan_iter("*", count=1000):
            value = _dump(client, key)
            if any(part in key or part in value for part in api_key):
                found.append(f"redis {key!r}")
    return found


def figures(outcome: FailoverOutcome) -> list[tuple[str, str]]:
    """The report's rows for the failover scenario: (what, value)."""
    name = "failover"
    if outcome.accept_wait_ms:
        name += f", REMIX_ACCEPT_WAIT_MS={outcome.accept_wait_ms}"

    def seconds(value: float) -> str:
        return f"{value:.1f} s" if value >= 0 else "never"

    return [
        (f"{name}: jobs, states", f"{outcome.jobs}: {_counts(outcome.states)}"),
        (f"{name}: lost", str(outcome.lost)),
        (
            f"{name}: paid twice, not flagged",
            f"{outcome.paid_twice_unflagged} (accepted twice by the upstream: "
            f"{outcome.accepted_twice}; records flagged possibly_paid_twice: "
            f"{outcome.flagged_possibly_twice}; unknown outcomes: {outcome.unknown_outcomes})",
        ),
        (f"{name}: leaks of the API key or a Redis password", str(len(outcome.leaks))),
        (
            f"{name}: primary SIGKILLed; replica promoted after",
            f"{seconds(outcome.promotion_s)} ({outcome.in_flight_at_kill} jobs in flight)",
        ),
        (f"{name}: every job moving again after the promotion", seconds(outcome.moved_again_s)),
        (
            f"{name}: lost by the asynchronous replication",
            f"{outcome.records_behind} records behind, {outcome.replication_bytes_lost} bytes "
            f"of the stream, {outcome.orphaned_tasks} accepted tasks in no record",
        ),
        (f"{name}: old primary back as a replica after", seconds(outcome.rejoined_s)),
        (f"{name}: HTTP app's /healthz not 200 for", seconds(outcome.healthz_degraded_s)),
        (f"{name}: workers that left their jobs to the lease", str(outcome.lease_notices)),
        (
            f"{name}: recording an acceptance, median (without / with WAIT)",
            f"{outcome.accept_ms[0]:.2f} / {outcome.accept_ms[1]:.2f} ms",
        ),
    ]


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(counter.items()))
