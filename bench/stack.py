"""The processes a benchmark runs: a private Redis, the sandbox and Celery workers.

Everything runs on this machine, on loopback ports picked at random, and everything
started is stopped again by :meth:`Stack.close` (the last started first). The Redis
server is private to the benchmark so that neither the measurement nor anyone else's
tests on the shared Redis disturb each other.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import redis

from sandbox.launch import (
    LOOPBACK,
    REPO_ROOT,
    WORKER_READY_MARK,
    LaunchError,
    ManagedProcess,
    free_port,
    redis_ping,
    start_sandbox,
    start_worker,
)

REDIS_START_TIMEOUT_S = 10.0
NAIVE_START_TIMEOUT_S = 60.0
READY_POLL_S = 0.1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Worker processes started side by side (their start-up is mostly waiting).
PARALLEL_STARTS = 3
#: Variables of the caller's environment that must not reach the benchmark's workers.
DROPPED_VARIABLES = ("KIE_CALLBACK_URL", "KIE_WEBHOOK_HMAC_KEY", "IDEOGRAM_BASE_URL")


class Stack:
    """The processes of one benchmark run and the producer side's connection to them.

    :param log_dir: where every process writes its log.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.api_key = f"sk-bench-{uuid.uuid4().hex}"
        self.redis_url = ""
        self.redis: redis.Redis | None = None
        self.redis_process: ManagedProcess | None = None
        self._started: list[ManagedProcess] = []
        self._names: dict[str, int] = {}

    # ------------------------------------------------------------------ processes

    def start_redis(self) -> str:
        """Start the private ``redis-server`` and point this process's producer at it.

        :returns: its URL.
        :raises LaunchError: when Redis is not installed or does not answer in time.
        """
        executable = shutil.which("redis-server")
        if executable is None:
            raise LaunchError("redis-server is not installed (apt-get install redis-server)")
        port = free_port()
        url = f"redis://{LOOPBACK}:{port}/0"
        command = [executable, "--port", str(port), "--bind", LOOPBACK]
        command += ["--save", "", "--appendonly", "no"]
        process = self._track(lambda: _spawn(command, os.environ, self._log("redis")))
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while not redis_ping(url):
            if process.popen.poll() is not None or time.monotonic() > deadline:
                raise LaunchError(
                    f"redis-server on port {port} did not start:\n{process.log_tail()}"
                )
            time.sleep(READY_POLL_S)
        self.redis_url = url
        self.redis_process = process
        self.redis = redis.Redis.from_url(url)
        _use_redis(url)
        return url

    def start_sandbox(self, args: Sequence[str]) -> ManagedProcess:
        """Start the sandbox with the benchmark's API key and ``args``."""
        full_args = ["--api-key", self.api_key, *args]
        return self._track(lambda: start_sandbox(args=full_args, log_path=self._log("sandbox")))

    def worker_env(self, sandbox: ManagedProcess, settings: Mapping[str, str]) -> dict[str, str]:
        """The environment of a worker of this stack, with ``settings`` on top."""
        return {
            "REDIS_URL": self.redis_url,
            "RESULT_BACKEND_URL": self.redis_url,
            "KIE_API_KEY": self.api_key,
            "KIE_BASE_URL": sandbox.url or "",
            **settings,
        }

    def start_workers(
        self,
        sandbox: ManagedProcess,
        count: int,
        *,
        concurrency: int,
        settings: Mapping[str, str],
        pool: str | None = None,
        naive: bool = False,
    ) -> list[ManagedProcess]:
        """Start ``count`` worker processes of the pipeline (or of :mod:`bench.naive`).

        They start side by side; the call returns when every one is ready.
        """
        env = self.worker_env(sandbox, settings)
        kind = "naive" if naive else "worker"

        def start_one(_: int) -> ManagedProcess:
            log_path = self._log(kind)
            if naive:
                return _start_naive_worker(env, concurrency, log_path)
            return start_worker(env, concurrency=concurrency, pool=pool, log_path=log_path)

        with _signals_held(), ThreadPoolExecutor(PARALLEL_STARTS) as executor:
            futures = [executor.submit(start_one, index) for index in range(count)]
            errors: list[BaseException] = []
            workers: list[ManagedProcess] = []
            for future in futures:
                try:
                    workers.append(future.result())
                except Exception as exc:  # every started worker must still be tracked
                    errors.append(exc)
            self._started.extend(workers)
        if errors:
            raise errors[0]
        return workers

    def stop(self, processes: Sequence[ManagedProcess]) -> None:
        """Stop some of this stack's processes (side by side; each may take a while)."""
        with _signals_held(), ThreadPoolExecutor(max(1, len(processes))) as executor:
            list(executor.map(lambda process: process.stop(), processes))
        for process in processes:
            if process in self._started:
                self._started.remove(process)

    def close(self) -> None:
        """Stop every process still running, the last started first."""
        if self.redis is not None:
            self.redis.close()
        with _signals_held(reraise=False):
            while self._started:
                self._started.pop().stop()

    # ----------------------------------------------------------------- the broker

    def flush(self) -> None:
        """Empty the private Redis (between measurements, with no worker running)."""
        assert self.redis is not None, "start_redis first"
        self.redis.flushall()

    # ------------------------------------------------------------------- helpers

    def _log(self, kind: str) -> Path:
        """A fresh log file name for a process of this kind."""
        self._names[kind] = self._names.get(kind, 0) + 1
        return self.log_dir / f"{kind}-{self._names[kind]}.log"

    def _track(self, start: Callable[[], ManagedProcess]) -> ManagedProcess:
        with _signals_held():
            process = start()
            self._started.append(process)
        return process


def _use_redis(url: str) -> None:
    """Point this process (the producer side) at ``url``.

    ``worker.settings`` is read once and ``worker.app`` is configured when imported,
    so the environment is set, the settings cache dropped and the app reconfigured;
    the job store and Celery's connections are only made after this.
    """
    os.environ["REDIS_URL"] = os.environ["RESULT_BACKEND_URL"] = url
    for name in DROPPED_VARIABLES:
        os.environ.pop(name, None)
    from bench.naive import app as naive_app
    from worker.app import app
    from worker.runtime import job_store
    from worker.settings import get_settings

    get_settings.cache_clear()
    for celery_app in (app, naive_app):
        celery_app.conf.update(broker_url=url, result_backend=url)
    port = job_store().redis.connection_pool.connection_kwargs.get("port")
    if str(port) != url.rsplit(":", 1)[1].split("/")[0]:
        raise LaunchError(f"the job store talks to port {port}, not to the benchmark's Redis")


def _spawn(command: list[str], env: Mapping[str, str], log_path: Path) -> ManagedProcess:
    """Start ``command`` in its own process group, its output going to ``log_path``."""
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return ManagedProcess(popen, log_path=log_path)


def _start_naive_worker(env: Mapping[str, str], concurrency: int, log_path: Path) -> ManagedProcess:
    """``celery -A bench.naive worker`` on the naive queue; returns once it says it is ready."""
    from bench.naive import NAIVE_QUEUE

    name = f"naive-{uuid.uuid4().hex[:8]}@%h"
    command = [sys.executable, "-m", "celery", "-A", "bench.naive", "worker"]
    command += ["--loglevel", "INFO", "-c", str(concurrency), "-n", name, "-Q", NAIVE_QUEUE]
    process = _spawn(command, {**os.environ, **env}, log_path)
    deadline = time.monotonic() + NAIVE_START_TIMEOUT_S
    while WORKER_READY_MARK not in log_path.read_text(errors="replace"):
        if process.popen.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise LaunchError(f"naive worker did not start:\n{process.log_tail()}")
        time.sleep(READY_POLL_S)
    return process


@contextmanager
def _signals_held(reraise: bool = True) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while processes start or stop, then act on them.

    A start interrupted half way would leave a process that nobody stops. Signal
    handlers can only be set from the main thread; elsewhere this does nothing.

    :param reraise: raise ``KeyboardInterrupt`` afterwards when a signal arrived.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received and reraise:
        raise KeyboardInterrupt
