"""Crash and restart safety with real processes: workers killed or stopped, Redis restarted.

Every test gets a redis-server of its own (a free port, every write in an append-only file)
so that it can be shut down and restarted without touching the shared test Redis, and a
fleet of ``celery -A worker.app worker`` processes pointed at it. The module shares one
sandbox upstream, which counts createTask requests and accepted tasks per prompt.

The producer side runs ``enqueue_remix`` in a short-lived process of its own (configured by
``REDIS_URL`` like any producer service) and reads job records through a ``JobStore`` bound to
the private Redis. Pointing this pytest process at the private Redis instead would mean
resetting Celery's cached producer pool and result backend (private attributes that moved
between Celery minor versions) and every per-process singleton of ``worker.runtime``, then
restoring all of it for the modules that run later; a miss would silently send jobs to the
wrong Redis. The subprocess shares no state with this process, so nothing can leak.

Recovery times follow from the schedule's lease (``Settings.lease_s``: the request deadline of
10 s in these tests plus 15 s): a job whose worker died is sent again once its lease runs out.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sandbox.control import SandboxControl
from sandbox.launch import (
    LOOPBACK,
    REPO_ROOT,
    ManagedProcess,
    free_port,
    start_redis,
    start_sandbox,
    start_worker,
)
from tests.conftest import FAST_SETTINGS, REMIX_INPUT, WORKER_ARGS, stop_all, unique_prompt
from tests.helpers import accepted, create_requests, start_snapshot_redis, wait_until
from tests.policy_kit import make_services, new_job, pick_now, submit_now
from worker import keys
from worker.models import JobRecord, JobState
from worker.policies.submit import record_acceptance
from worker.services import Services
from worker.store.connection import WORKER_REDIS_RETRY_S
from worker.store.jobs import ATTEMPT_FIELD, JobStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

API_KEY = f"sk-resilience-{uuid.uuid4().hex}"
GENERATION_S = 3
#: The lease (25 s here) + an attempt left open by the killed worker settling (55 s) + the
#: job itself, with room to spare.
RECOVERY_BUDGET_S = 120
JOB_TIMEOUT_S = 60
REDIS_START_TIMEOUT_S = 10.0
REDIS_DOWN_S = 3.0
BROKER_DOWN_S = 10.0
#: Longer than a worker's Redis commands retry on their own (15 s).
LONG_REDIS_OUTAGE_S = 20.0
#: After the broker returns: its reconnection (a few seconds) and the rest of the jobs' work
#: (15 jobs at 4 per second, 3 s generation, polls), well under the 45 s lease.
RECOVERY_AFTER_BROKER_S = 25.0
#: The throttle that keeps jobs waiting for their createTask while others already poll:
#: the upstream accepts 4 per second, and the fleet is told the same budget.
#: A lost message's job must finish well within its 45 s lease (from enqueue to success:
#: a worker's start, a 3 s broker outage and reconnection, the job's own 3 s generation).
LOST_MESSAGE_RECOVERY_S = 35.0
#: Longer than a worker's own Redis retries (15 s): the dispatcher's rounds fail.
STORE_FAILOVER_S = 17.0
#: The createTask answer comes after the job store is back (the request is in flight).
CREATE_TASK_S = 24.0
THROTTLE = "4/1s"
#: Upstream 429s are retried; the retry budget must not be what the throttle tests.
THROTTLED_MAX_RETRIES = "60"
#: How long Redis writes may stay paused while a worker is killed or Redis is stopped.
WRITE_PAUSE_MS = 3000
SANDBOX_RESET = {
    "faults": {},
    "fault_endpoints": ["createTask", "recordInfo"],
    "slow_rate": 0.0,
    "rate_limit": None,
    "generation_seconds": float(GENERATION_S),
}
BROKER_CONNECTED = "] Connected to redis://"
RECONNECT_TIMEOUT_S = 30
SUBMIT_RECEIVED = re.compile(r"Task remix\.submit\[([0-9a-f]+)\] received")
#: A producer service in a few lines: the public API, configured by the environment.
PRODUCER = """
import json, sys
from producers import enqueue_remix
job = json.load(sys.stdin)
print(json.dumps([enqueue_remix(prompt=p, **job["input"]) for p in job["prompts"]]))
"""


class PrivateRedis:
    """A redis-server for one test, on a free port, that keeps every write in an AOF."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://{LOOPBACK}:{self.port}/0"
        self.log_path = directory / "redis.log"
        self.process: ManagedProcess | None = None

    def start(self) -> None:
        """Start the server (again, on the same port and directory) and wait for PING."""
        server = start_redis(self.port, append_only_dir=self.directory, log_path=self.log_path)
        self.process = server.process

    def admin(self) -> redis.Redis:
        """A client that fails at once instead of reconnecting (for PAUSE and SHUTDOWN)."""
        return redis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0))

    def wait_exit(self) -> int:
        """Wait for the server to exit after a SHUTDOWN; returns its exit status."""
        assert self.process is not None
        return self.process.popen.wait(REDIS_START_TIMEOUT_S)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class SnapshotRedis:
    """A redis-server whose data is whatever its last SAVE held (a failover to a replica
    that had not received the last writes, or a restart that lost them)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://{LOOPBACK}:{self.port}/0"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.popen = start_snapshot_redis(self.port, self.directory)

    def lose_writes_since_snapshot(self, down_s: float) -> None:
        with redis.Redis.from_url(self.url) as admin, contextlib.suppress(redis.ConnectionError):
            admin.shutdown(nosave=True)
        assert self.popen is not None
        self.popen.wait(10)
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            self.popen.wait(10)


@pytest.fixture(scope="module")
def producer_env() -> None:
    """Replaces the suite's fixture of that name for this module.

    The suite's version points this process at the shared test Redis and empties it; the
    producer here runs in subprocesses against a private Redis and needs neither.
    """


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    log_path = tmp_path_factory.mktemp("resilience") / "sandbox.log"
    process = start_sandbox(
        args=["--api-key", API_KEY, "--generation-seconds", str(GENERATION_S)],
        log_path=log_path,
    )
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def upstream_control(upstream: ManagedProcess) -> Iterator[SandboxControl]:
    """The sandbox's control endpoint; its faults and limits are reset after each test."""
    assert upstream.url is not None
    control = SandboxControl(upstream.url)
    control.configure(**SANDBOX_RESET)
    try:
        yield control
    finally:
        control.configure(**SANDBOX_RESET)
        control.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def store(private_redis: PrivateRedis) -> Iterator[JobStore]:
    """Job records in the private Redis, read as a producer reads them."""
    client = redis.Redis.from_url(private_redis.url)
    try:
        yield JobStore(client, ttl_s=3600)
    finally:
        client.close()


class Fleet:
    """Worker processes on the private Redis and the module's sandbox; all stopped at the end."""

    def __init__(self, redis_url: str, sandbox_url: str, log_dir: Path) -> None:
        self.redis_url = redis_url
        self.sandbox_url = sandbox_url
        self.log_dir = log_dir
        self.workers: list[ManagedProcess] = []

    def start(self, count: int, **overrides: str) -> list[ManagedProcess]:
        env = {
            "REDIS_URL": self.redis_url,
            "RESULT_BACKEND_URL": self.redis_url,
            "KIE_API_KEY": API_KEY,
            "KIE_BASE_URL": self.sandbox_url,
            **FAST_SETTINGS,
            **overrides,
        }
        started = []
        for _ in range(count):
            name = f"resilience-{uuid.uuid4().hex[:8]}"
            process = start_worker(
                env,
                concurrency=2,
                hostname=f"{name}@%h",
                log_path=self.log_dir / f"{name}.log",
                extra_args=WORKER_ARGS,
            )
            self.workers.append(process)
            started.append(process)
        return started

    def logs(self) -> str:
        return ", ".join(str(w.log_path) for w in self.workers)

    def stop_all(self) -> None:
        stop_all(self.workers)


@pytest.fixture
def fleet(private_redis: PrivateRedis, upstream: ManagedProcess, tmp_path: Path) -> Iterator[Fleet]:
    assert upstream.url is not None
    workers = Fleet(private_redis.url, upstream.url, tmp_path)
    try:
        yield workers
    finally:
        workers.stop_all()


def enqueue(redis_url: str, prompts: Sequence[str], backend_url: str | None = None) -> list[str]:
    """Enqueue one job per prompt with ``enqueue_remix``, from a producer process of its own."""
    env = {**os.environ, "REDIS_URL": redis_url, "RESULT_BACKEND_URL": backend_url or redis_url}
    result = subprocess.run(
        [sys.executable, "-c", PRODUCER],
        input=json.dumps({"prompts": list(prompts), "input": REMIX_INPUT}),
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    job_ids: list[str] = json.loads(result.stdout.splitlines()[-1])
    assert len(job_ids) == len(prompts)
    return job_ids


def records(store: JobStore, job_ids: Sequence[str]) -> list[JobRecord]:
    found = [store.get(job_id) for job_id in job_ids]
    missing = [j for j, r in zip(job_ids, found, strict=True) if r is None]
    assert not missing, f"job records lost: {missing}"
    return [r for r in found if r is not None]


def wait_finished(
    store: JobStore, job_ids: Sequence[str], timeout: float, logs: str
) -> list[JobRecord]:
    """Wait until every job has finished; on timeout say which are stuck, and where to look."""
    deadline = time.monotonic() + timeout
    while True:
        current = records(store, job_ids)
        if all(r.finished for r in current):
            return current
        if time.monotonic() > deadline:
            stuck = {r.job_id: r.state.value for r in current if not r.finished}
            raise AssertionError(f"unfinished after {timeout:g}s: {stuck}; worker logs: {logs}")
        time.sleep(0.5)


def split_by_acceptance(store: JobStore, job_ids: Sequence[str]) -> tuple[int, int]:
    """How many jobs have an upstream task, and how many have none yet."""
    current = records(store, job_ids)
    with_task = sum(1 for r in current if r.upstream_task_id)
    return with_task, len(current) - with_task


@contextlib.contextmanager
def between_create_tasks(server: PrivateRedis) -> Iterator[redis.Redis]:
    """Pause every Redis write of the fleet at a moment when no createTask answer is outstanding.

    A job's record holds an open attempt from just before its createTask until the answer is
    recorded (``worker.policies.submit``). While writes are paused nobody can open one, so when
    none is open no worker is between an upstream acceptance and its record. A worker killed
    (or Redis stopped) in this block tests recovery without landing in the one window the
    design admits may charge a job twice: an answer lost with the process that received it.
    Yields the admin client, so the block can also shut the server down.
    """
    admin = server.admin()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        admin.client_pause(WRITE_PAUSE_MS, all=False)
        if not any_attempt_open(admin):
            break
        admin.client_unpause()
        assert time.monotonic() < deadline, "a submit claim was held the whole time"
        time.sleep(0.005)
    try:
        yield admin
    finally:
        with contextlib.suppress(redis.ConnectionError):
            admin.client_unpause()
        admin.close()


def any_attempt_open(client: redis.Redis) -> bool:
    """Whether any job's record holds an open createTask attempt."""
    for key in client.scan_iter(match=keys.JOB_PREFIX + "*"):
        raw = client.hget(key, ATTEMPT_FIELD)
        if raw is not None and json.loads(raw) is not None:
            return True
    return False


def submits_received(worker: ManagedProcess) -> set[str]:
    """Job ids whose ``remix.submit`` the worker received (its task id is the job id)."""
    assert worker.log_path is not None
    return set(SUBMIT_RECEIVED.findall(worker.log_path.read_text(errors="replace")))


def reconnected(worker: ManagedProcess) -> bool:
    """Whether the worker has connected to the broker more than once (it reconnected)."""
    assert worker.log_path is not None
    return worker.log_path.read_text(errors="replace").count(BROKER_CONNECTED) > 1


def assert_each_accepted_once(control: SandboxControl, prompts: Sequence[str]) -> None:
    counts = {p: accepted(control, p) for p in prompts}
    assert counts == dict.fromkeys(prompts, 1), {p: n for p, n in counts.items() if n != 1}


def test_sigkill_one_of_three_workers_mid_run_loses_no_job_and_pays_once(
    upstream_control: SandboxControl, fleet: Fleet, store: JobStore, private_redis: PrivateRedis
) -> None:
    upstream_control.configure(rate_limit=THROTTLE)
    victim, *survivors = fleet.start(
        3, KIE_RATE_LIMIT=THROTTLE, REMIX_MAX_RETRIES=THROTTLED_MAX_RETRIES
    )
    prompts = [unique_prompt(f"sigkill-{i}") for i in range(20)]
    job_ids = enqueue(private_redis.url, prompts)

    # Kill mid-run: some jobs accepted upstream and polling, some still waiting to submit.
    wait_until(
        lambda: min(split_by_acceptance(store, job_ids)) >= 5 and submits_received(victim),
        timeout=JOB_TIMEOUT_S,
        interval=0.05,
    )
    with between_create_tasks(private_redis):
        with_task, without_task = split_by_acceptance(store, job_ids)
        victim.kill()
    assert with_task >= 5 and without_task >= 5
    killed_at = time.monotonic()

    final = wait_finished(store, job_ids, RECOVERY_BUDGET_S, fleet.logs())

    assert Counter(r.state for r in final) == {JobState.SUCCEEDED: len(job_ids)}
    assert all(r.result_urls for r in final)
    assert_each_accepted_once(upstream_control, prompts)
    assert len({r.upstream_task_id for r in final}) == len(job_ids)
    assert time.monotonic() - killed_at < RECOVERY_BUDGET_S
    assert all(w.popen.poll() is None for w in survivors)


def test_redis_restart_with_aof_mid_run_every_job_finishes_once(
    upstream_control: SandboxControl, fleet: Fleet, store: JobStore, private_redis: PrivateRedis
) -> None:
    upstream_control.configure(rate_limit=THROTTLE)
    workers = fleet.start(2, KIE_RATE_LIMIT=THROTTLE, REMIX_MAX_RETRIES=THROTTLED_MAX_RETRIES)
    prompts = [unique_prompt(f"redis-restart-{i}") for i in range(15)]
    job_ids = enqueue(private_redis.url, prompts)

    wait_until(lambda: min(split_by_acceptance(store, job_ids)) >= 4, JOB_TIMEOUT_S, 0.05)
    with between_create_tasks(private_redis) as admin:
        with_task, without_task = split_by_acceptance(store, job_ids)
        admin.shutdown()
    assert private_redis.wait_exit() == 0
    assert with_task >= 4 and without_task >= 4
    time.sleep(REDIS_DOWN_S)  # the outage itself, not a wait for a result
    private_redis.start()

    # Nothing was lost with the server: the records are back from the AOF.
    after_restart = records(store, job_ids)
    assert sum(1 for r in after_restart if r.upstream_task_id) >= with_task
    # Every worker reconnects rather than exiting. With Celery/kombu 5.7 a worker that held
    # unacknowledged messages could die here ("Unrecoverable error: AttributeError ...
    # 'hostname'" while restoring them); worker.fleet.broker_guard keeps it alive.
    wait_until(
        lambda: all(w.popen.poll() is not None or reconnected(w) for w in workers),
        timeout=RECONNECT_TIMEOUT_S,
    )
    statuses = [w.popen.poll() for w in workers]
    assert statuses == [None] * len(workers), f"exit statuses {statuses}; logs: {fleet.logs()}"

    # Jobs whose steps were cut off by the outage are sent again by the schedule.
    final = wait_finished(store, job_ids, RECOVERY_BUDGET_S, fleet.logs())

    assert Counter(r.state for r in final) == {JobState.SUCCEEDED: len(job_ids)}
    assert_each_accepted_once(upstream_control, prompts)


def test_sigterm_warm_shutdown_finishes_the_in_flight_submit(
    upstream_control: SandboxControl, fleet: Fleet, store: JobStore, private_redis: PrivateRedis
) -> None:
    upstream_control.configure(slow_rate=1.0, slow_seconds=3.0, fault_endpoints=["createTask"])
    (first,) = fleet.start(1)
    prompts = [unique_prompt(f"sigterm-{i}") for i in range(4)]
    job_ids = enqueue(private_redis.url, prompts)
    by_prompt: Mapping[str, str] = dict(zip(prompts, job_ids, strict=True))

    def in_flight() -> list[str]:
        """Jobs whose createTask the upstream has received but not answered yet."""
        return [
            p
            for p in prompts
            if create_requests(upstream_control, p)
            and not records(store, [by_prompt[p]])[0].upstream_task_id
        ]

    pending = wait_until(in_flight, timeout=JOB_TIMEOUT_S, interval=0.05)
    status = first.stop(timeout=30)

    assert status == 0, first.log_tail()
    for prompt in pending:  # the answer arrived before the worker exited, and was recorded
        record = records(store, [by_prompt[prompt]])[0]
        assert record.upstream_task_id and record.submit_attempts == 1, record

    fleet.start(1)
    final = wait_finished(store, job_ids, JOB_TIMEOUT_S, fleet.logs())

    assert Counter(r.state for r in final) == {JobState.SUCCEEDED: len(job_ids)}
    assert_each_accepted_once(upstream_control, prompts)
    assert [create_requests(upstream_control, p) for p in prompts] == [1] * len(prompts)


def broker_and_backend(tmp_path: Path) -> tuple[PrivateRedis, PrivateRedis]:
    """Two private servers, started: the broker and the job store (so one can go alone)."""
    broker, backend = PrivateRedis(tmp_path / "broker"), PrivateRedis(tmp_path / "backend")
    for server in (broker, backend):
        server.directory.mkdir()
        server.start()
    return broker, backend


def test_broker_outage_every_job_moves_again_as_soon_as_it_returns(
    upstream_control: SandboxControl, upstream: ManagedProcess, tmp_path: Path
) -> None:
    """The broker (alone) is down for 10 s mid-run; jobs go on the moment it is back.

    The job store is on a server of its own and stays up. The lease is made long (45 s), so
    that jobs finishing well within it shows that nothing waited for a lease to run out (or
    for the broker's visibility timeout): parked jobs hold no message in any worker.
    """
    assert upstream.url is not None
    broker, backend = broker_and_backend(tmp_path)
    workers = Fleet(broker.url, upstream.url, tmp_path)
    try:
        # Slow answers keep tasks running when the broker goes: their acknowledgements
        # then meet a dead connection.
        upstream_control.configure(rate_limit=THROTTLE, slow_rate=0.5, slow_seconds=1.5)
        started = workers.start(
            2,
            RESULT_BACKEND_URL=backend.url,
            KIE_RATE_LIMIT=THROTTLE,
            KIE_REQUEST_DEADLINE_S="30",
            REMIX_MAX_RETRIES=THROTTLED_MAX_RETRIES,
        )
        client = redis.Redis.from_url(backend.url)
        store = JobStore(client, ttl_s=3600)
        prompts = [unique_prompt(f"broker-outage-{i}") for i in range(15)]
        job_ids = enqueue(broker.url, prompts, backend_url=backend.url)
        wait_until(lambda: min(split_by_acceptance(store, job_ids)) >= 4, JOB_TIMEOUT_S, 0.05)

        with broker.admin() as admin:
            admin.shutdown()
        assert broker.wait_exit() == 0
        time.sleep(BROKER_DOWN_S)  # the outage itself
        broker.start()
        returned_at = time.monotonic()

        final = wait_finished(store, job_ids, RECOVERY_AFTER_BROKER_S, workers.logs())
        recovered_in = time.monotonic() - returned_at
        exits = [w.popen.poll() for w in started]
    finally:
        workers.stop_all()
        broker.stop()
        backend.stop()

    assert exits == [None] * len(started), f"workers exited: {exits}; logs: {workers.logs()}"
    assert Counter(r.state for r in final) == {JobState.SUCCEEDED: len(job_ids)}
    assert_each_accepted_once(upstream_control, prompts)
    assert recovered_in < RECOVERY_AFTER_BROKER_S


def test_a_message_lost_as_the_broker_went_down_moves_when_it_returns_not_after_its_lease(
    upstream: ManagedProcess, tmp_path: Path
) -> None:
    """A message taken in the instant the broker went down is gone from the broker.

    The lost message is made here by handing the job out (a send moment picks it) without
    publishing its message (no worker ran yet), before the broker goes down for a moment.
    The job must be sent again as soon as the broker is back, well within its lease (45 s),
    because its step never began.
    """
    assert upstream.url is not None
    broker, backend = broker_and_backend(tmp_path)
    workers = Fleet(broker.url, upstream.url, tmp_path)
    try:
        store = JobStore(redis.Redis.from_url(backend.url), ttl_s=3600)
        enqueued_at = time.monotonic()
        job_ids = enqueue(broker.url, [unique_prompt("lost-message")], backend_url=backend.url)
        svc = make_services(
            upstream.url, redis_url=broker.url, result_backend_url=backend.url, kie_api_key=API_KEY
        )
        assert [d.job_id for d in pick_now(svc)] == job_ids  # handed out; its message is lost
        [worker] = workers.start(1, RESULT_BACKEND_URL=backend.url, KIE_REQUEST_DEADLINE_S="30")
        wait_until(lambda: BROKER_CONNECTED in worker.log_tail(), RECONNECT_TIMEOUT_S, 0.1)

        with broker.admin() as admin:
            admin.shutdown()
        assert broker.wait_exit() == 0
        time.sleep(REDIS_DOWN_S)
        broker.start()

        [final] = wait_finished(store, job_ids, LOST_MESSAGE_RECOVERY_S, workers.logs())
        finished_in = time.monotonic() - enqueued_at
    finally:
        workers.stop_all()
        broker.stop()
        backend.stop()

    assert final.state is JobState.SUCCEEDED and final.submit_attempts == 1
    assert finished_in < LOST_MESSAGE_RECOVERY_S, finished_in
    assert worker.log_path is not None
    assert "never began are sent again" in worker.log_path.read_text(errors="replace")


def test_a_job_store_failover_that_lost_the_begin_does_not_send_a_second_create_task(
    upstream_control: SandboxControl, upstream: ManagedProcess, tmp_path: Path
) -> None:
    """The job store fails over (longer than the workers' 15 s of retries) and the new
    master lacks the last writes: the submit step's begin and its open attempt. The step is
    alive, its createTask in flight. The lease (request deadline + margin) exists so that a
    job is never sent again while its request may be in flight; the job must not be sent
    again before that step's answer is recorded."""
    assert upstream.url is not None
    broker = PrivateRedis(tmp_path / "broker")
    broker.directory.mkdir()
    broker.start()
    store_server = SnapshotRedis(tmp_path / "store")
    store_server.start()
    workers = Fleet(broker.url, upstream.url, tmp_path)
    try:
        upstream_control.configure(
            fault_endpoints=["createTask"], slow_rate=1.0, slow_seconds=CREATE_TASK_S
        )
        store = JobStore(redis.Redis.from_url(store_server.url), ttl_s=3600)
        prompt = unique_prompt("store-failover")
        [job_id] = enqueue(broker.url, [prompt], backend_url=store_server.url)
        with redis.Redis.from_url(store_server.url) as admin:
            admin.save()  # what the replica holds: the job handed out, its step not begun
        workers.start(
            1,
            RESULT_BACKEND_URL=store_server.url,
            KIE_REQUEST_DEADLINE_S="40",
            KIE_READ_TIMEOUT_S="35",
        )
        wait_until(lambda: create_requests(upstream_control, prompt) == 1, 30, 0.05)
        assert store.get_internal(job_id, ATTEMPT_FIELD) not in (None, b"null", "null")

        store_server.lose_writes_since_snapshot(STORE_FAILOVER_S)

        [final] = wait_finished(store, [job_id], 60, workers.logs())
    finally:
        workers.stop_all()
        broker.stop()
        store_server.stop()

    assert accepted(upstream_control, prompt) == 1, (
        f"createTask accepted {accepted(upstream_control, prompt)} times; "
        f"state {final.state}, logs: {workers.logs()}"
    )


def _policy_services(upstream_url: str, redis_url: str) -> Services:
    """The pipeline's collaborators in this process, with a worker's Redis retries."""
    return make_services(
        upstream_url,
        redis_retry_s=WORKER_REDIS_RETRY_S,
        redis_url=redis_url,
        result_backend_url=redis_url,
        kie_api_key=API_KEY,
    )


def test_redis_down_right_after_create_task_records_the_task_and_pays_once(
    upstream_control: SandboxControl, upstream: ManagedProcess, private_redis: PrivateRedis
) -> None:
    """createTask is accepted while Redis is down: the task id is recorded once it is back.

    A retry of the step would have called createTask again (and paid twice).
    """
    assert upstream.url is not None
    upstream_control.configure(slow_rate=1.0, slow_seconds=1.5, fault_endpoints=["createTask"])
    svc = _policy_services(upstream.url, private_redis.url)
    job_id, prompt = new_job(svc)

    def outage() -> None:
        wait_until(lambda: create_requests(upstream_control, prompt) >= 1, JOB_TIMEOUT_S, 0.02)
        with private_redis.admin() as admin:
            admin.shutdown()
        private_redis.wait_exit()
        time.sleep(REDIS_DOWN_S)
        private_redis.start()

    restarter = threading.Thread(target=outage)
    restarter.start()
    outcome = submit_now(svc, job_id)
    restarter.join(JOB_TIMEOUT_S)

    assert outcome == "accepted"
    record = svc.store.get(job_id)
    assert record is not None and record.upstream_task_id and record.submit_attempts == 1
    assert (create_requests(upstream_control, prompt), accepted(upstream_control, prompt)) == (1, 1)


def test_an_accepted_task_is_recorded_however_long_redis_stays_down(
    upstream_control: SandboxControl, upstream: ManagedProcess, private_redis: PrivateRedis
) -> None:
    """Redis (broker and job store in one) is down past the attempt's settling: the task id
    is kept in the worker and written when Redis is back; nothing else can be trusted with
    it, since a retry message would need the very broker that is down."""
    assert upstream.url is not None
    svc = _policy_services(upstream.url, private_redis.url)
    job_id, prompt = new_job(svc)
    assert (
        svc.store.begin_attempt(job_id, "attempt-1", svc.settings.attempt_settle_s).status == "ok"
    )
    with private_redis.admin() as admin:
        admin.shutdown()
    private_redis.wait_exit()
    restarter = threading.Timer(LONG_REDIS_OUTAGE_S, private_redis.start)
    restarter.start()

    outcome = record_acceptance(svc, job_id, "attempt-1", "task-while-down")

    restarter.join()
    assert outcome == "accepted"
    record = svc.store.get(job_id)
    assert record is not None and record.upstream_task_id == "task-while-down"
    assert record.attempt_started_at is None and record.unknown_outcomes == 0
    assert create_requests(upstream_control, prompt) == 0


def test_a_worker_warns_when_redis_may_evict_job_records(
    fleet: Fleet, private_redis: PrivateRedis
) -> None:
    """Records carry a TTL, so ``volatile-*`` policies would evict charged jobs first."""
    with private_redis.admin() as admin:
        admin.config_set("maxmemory-policy", "volatile-lru")
    (worker,) = fleet.start(1)
    assert worker.log_path is not None
    wait_until(lambda: "maxmemory-policy" in worker.log_path.read_text(), timeout=15)
    log = worker.log_path.read_text()
    assert "volatile-lru" in log and "noeviction" in log


def test_an_accepted_task_is_recorded_through_a_redis_that_refuses_writes(
    upstream_control: SandboxControl, upstream: ManagedProcess, private_redis: PrivateRedis
) -> None:
    """Out of memory (or read-only after a failover): refused writes are tried again too."""
    assert upstream.url is not None
    svc = _policy_services(upstream.url, private_redis.url)
    job_id, _ = new_job(svc)
    assert (
        svc.store.begin_attempt(job_id, "attempt-1", svc.settings.attempt_settle_s).status == "ok"
    )
    with private_redis.admin() as admin:
        admin.config_set("maxmemory", "1")
        admin.config_set("maxmemory-policy", "noeviction")
    relief = threading.Timer(2.0, lambda: private_redis.admin().config_set("maxmemory", "0"))
    relief.start()

    outcome = record_acceptance(svc, job_id, "attempt-1", "task-refused-write")

    relief.join()
    assert outcome == "accepted"
    record = svc.store.get(job_id)
    assert record is not None and record.upstream_task_id == "task-refused-write"
