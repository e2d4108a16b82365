"""Fixtures for the integration tests: real Redis, real workers, the sandbox over HTTP.

A session-wide sandbox and a pair of worker processes (``celery -A worker.app
worker`` subprocesses with fast poll/retry settings) serve most tests; tests
that need other settings, or that kill workers, start their own with
``start_workers``. Jobs of different tests never collide: every test uses its
own prompts, and the sandbox counts createTask requests per prompt. Each pytest process
(every xdist worker) has its own Redis (:mod:`tests.redis_kit`) and sandbox, so modules
of different xdist workers run side by side; :mod:`tests.schedule_kit` marks the tests
that start processes and orders the modules.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from sandbox.control import SandboxControl
from sandbox.launch import ManagedProcess, die_with_parent, start_sandbox, start_worker
from tests import redis_kit, schedule_kit
from tests.helpers import empty_database

pytest_plugins = ["tests.policy_kit"]

#: A distinctive key, so that a leak into a log line or a Redis value is found.
SECRET_API_KEY = f"sk-test-SECRET-{uuid.uuid4().hex}"
SANDBOX_GENERATION_S = 1.0
FAST_SETTINGS = {
    "REMIX_POLL_INITIAL_S": "0.3",
    "REMIX_POLL_MAX_S": "1",
    "REMIX_RETRY_BASE_S": "0.05",
    "REMIX_RETRY_MAX_S": "0.5",
    "REMIX_MAX_RETRIES": "8",
    "REMIX_DEADLINE_S": "120",
    "REMIX_PAUSE_PROBE_S": "1",
    # A short request deadline makes a short lease: a lost job is sent again within 25 s.
    "KIE_REQUEST_DEADLINE_S": "10",
    # Tests of other behaviour should not wait for the key's budget.
    "KIE_RATE_LIMIT": "1000/1s",
}
#: The tests' workers skip Celery's start-up sync with the other workers ("mingle": revoked
#: task ids and logical clocks, neither of which remixq uses), which waits a second for
#: answers at every start.
WORKER_ARGS = ("--without-mingle",)
SANDBOX_DEFAULTS: dict[str, Any] = {
    "api_key": SECRET_API_KEY,
    "faults": {},
    "fault_style": "http",
    "fault_endpoints": ["createTask", "recordInfo"],
    "reset_rate": 0.0,
    "html_rate": 0.0,
    "slow_rate": 0.0,
    "rate_limit": None,
    "credits": None,
    "maintenance": False,
    "generation_seconds": SANDBOX_GENERATION_S,
    "cut_rate": 0.0,
    "drop_rate": 0.0,
    "gateway_rate": 0.0,
    "trickle_rate": 0.0,
    "trickle_seconds": 1.0,
    "retry_after": None,
}


def pytest_addoption(parser: pytest.Parser) -> None:
    schedule_kit.add_option(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        die_with_parent()  # an xdist worker, and all it starts, ends with pytest
    redis_kit.start(config)
    schedule_kit.register_writer(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    redis_kit.stop(config)


@pytest.fixture
def restore_producer() -> Iterator[None]:
    """For a scenario that points this process at Redis servers of its own: point it back
    at the test Redis after."""
    from worker.app import configure

    yield None
    url = redis_kit.url(redis_kit.MAIN)
    configure(redis_url=url, result_backend_url=url)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that start processes, then put the slowest modules first."""
    schedule_kit.mark_by_fixtures(items)
    schedule_kit.slowest_first(items)


def __getattr__(name: str) -> str:
    """``TEST_REDIS_URL``, the main test database: read when asked, because the test Redis
    starts (:mod:`tests.redis_kit`) after this module is imported."""
    if name == "TEST_REDIS_URL":
        return redis_kit.url(redis_kit.MAIN)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    url = redis_kit.url(redis_kit.MAIN)
    with empty_database(url, "integration tests", empty_after=False) as client:
        yield client


@pytest.fixture(scope="session")
def sandbox(log_dir: Path) -> Iterator[ManagedProcess]:
    process = start_sandbox(
        args=["--api-key", SECRET_API_KEY, "--generation-seconds", str(SANDBOX_GENERATION_S)],
        log_path=log_dir / "sandbox.log",
    )
    yield process
    process.stop()


@pytest.fixture
def control(sandbox: ManagedProcess) -> Iterator[SandboxControl]:
    """The sandbox's control endpoint; its faults are reset after each test."""
    ctl = SandboxControl(sandbox.url)
    ctl.configure(**SANDBOX_DEFAULTS)
    yield ctl
    ctl.configure(**SANDBOX_DEFAULTS)


def worker_env(sandbox_url: str, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    redis_url = redis_kit.url(redis_kit.MAIN)
    env.update(
        REDIS_URL=redis_url,
        RESULT_BACKEND_URL=redis_url,
        KIE_API_KEY=SECRET_API_KEY,
        KIE_BASE_URL=sandbox_url,
        KIE_UPLOAD_BASE_URL=sandbox_url,
        **FAST_SETTINGS,
    )
    env.pop("KIE_CALLBACK_URL", None)
    env.update(overrides)
    return env


@pytest.fixture(scope="session", autouse=True)
def producer_env(redis_client: redis.Redis) -> Iterator[None]:
    """Point this process (the producer side) at the test Redis."""
    from worker.app import configure

    url = redis_kit.url(redis_kit.MAIN)
    configure(redis_url=url, result_backend_url=url)
    yield
    configure()


StartWorkers = Callable[..., list[ManagedProcess]]


def stop_all(processes: Iterable[ManagedProcess]) -> None:
    """Stop processes side by side: a worker's warm shutdown takes a few seconds."""
    started = list(processes)
    if started:
        with ThreadPoolExecutor(len(started)) as pool:
            list(pool.map(lambda process: process.stop(), started))


@pytest.fixture(scope="module")
def fleet(
    request: pytest.FixtureRequest, sandbox: ManagedProcess, log_dir: Path
) -> Iterator[list[ManagedProcess]]:
    """Worker processes for one test module.

    A module sets ``WORKER_SETTINGS`` (env overrides) and ``WORKER_COUNT`` to
    change them. Workers of different modules never run at the same time in one pytest
    process; each xdist worker has a Redis (broker) and a sandbox of its own.
    """
    overrides = getattr(request.module, "WORKER_SETTINGS", {})
    count = getattr(request.module, "WORKER_COUNT", 2)
    module = request.module.__name__.rsplit(".", 1)[-1]
    workers: list[ManagedProcess] = []
    try:
        for i in range(count):
            name = f"{module}-{i}-{uuid.uuid4().hex[:6]}"
            workers.append(
                start_worker(
                    worker_env(sandbox.url, **overrides),
                    concurrency=2,
                    hostname=f"{name}@%h",
                    log_path=log_dir / f"{name}.log",
                    extra_args=WORKER_ARGS,
                )
            )
        yield workers
    finally:
        stop_all(workers)


@pytest.fixture
def start_workers(sandbox: ManagedProcess, log_dir: Path) -> Iterator[StartWorkers]:
    """Start extra worker processes with other settings; stopped after the test."""
    started: list[ManagedProcess] = []

    def start(
        count: int = 1, concurrency: int | None = 2, pool: str | None = None, **overrides: str
    ) -> list[ManagedProcess]:
        for _ in range(count):
            name = f"extra-{uuid.uuid4().hex[:8]}"
            started.append(
                start_worker(
                    worker_env(sandbox.url, **overrides),
                    concurrency=concurrency,
                    pool=pool,
                    hostname=f"{name}@%h",
                    log_path=log_dir / f"{name}.log",
                    extra_args=WORKER_ARGS,
                )
            )
        return started[-count:]

    yield start
    stop_all(started)


def unique_prompt(label: str) -> str:
    return f"{label} {uuid.uuid4().hex[:10]}"


REMIX_INPUT = {
    "image_url": "https://example.test/base.png",
    "reference_image_urls": ["https://example.test/ref.png"],
}
