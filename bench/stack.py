"""The processes a benchmark runs: a private Redis, the sandbox, Celery workers, the HTTP app.

Everything runs on this machine, on loopback ports picked at random, and everything
started is stopped again by :meth:`Stack.close` (the last started first). The Redis
server is private to the benchmark so that neither the measurement nor anyone else's
tests on the shared Redis disturb each other.
"""

from __future__ import annotations

import signal
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

import redis

from bench.naive import NAIVE_QUEUE
from bench.naive import app as naive_app
from sandbox.launch import (
    LaunchError,
    ManagedProcess,
    start_api,
    start_redis,
    start_sandbox,
    start_worker,
)
from worker.app import configure, services

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Worker processes started side by side (their start-up is mostly waiting).
PARALLEL_STARTS = 3
#: Settings of the caller's environment that must not reach the benchmark: no callbacks to
#: a real endpoint, no relay. The producer side sets them to None; workers get them empty,
#: which the settings read as unset.
UNSET_SETTINGS = ("kie_callback_url", "kie_webhook_hmac_key", "ideogram_base_url")


class Stack:
    """The processes of one benchmark run and the producer side's connection to them.

    :param log_dir: where every process writes its log.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.api_key = f"sk-bench-{uuid.uuid4().hex}"
        #: Signs the sandbox's callbacks; the workers and the HTTP app check them with it.
        self.webhook_key = f"whk-bench-{uuid.uuid4().hex}"
        #: The bearer token of the HTTP app (``REMIX_API_TOKENS``).
        self.api_token = f"tok-bench-{uuid.uuid4().hex}"
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
        with _signals_held():
            server = start_redis(log_path=self._log("redis"))
            self._started.append(server.process)
        self.redis_url = server.url
        self.redis_process = server.process
        self.redis = redis.Redis.from_url(server.url)
        _use_redis(server.url)
        return server.url

    def start_sandbox(self, args: Sequence[str]) -> ManagedProcess:
        """Start the sandbox with the benchmark's API key and ``args``."""
        full_args = ["--api-key", self.api_key, *args]
        return self._track(lambda: start_sandbox(args=full_args, log_path=self._log("sandbox")))

    def worker_env(
        self, sandbox: ManagedProcess | None, settings: Mapping[str, str]
    ) -> dict[str, str | None]:
        """The environment of a worker (or of the HTTP app) of this stack, ``settings`` on top.

        :param sandbox: the upstream it talks to; None for a process that never does.
        """
        upstream = (
            {}
            if sandbox is None
            else {"KIE_BASE_URL": sandbox.url or "", "KIE_UPLOAD_BASE_URL": sandbox.url or ""}
        )
        return {
            # None removes a variable: a secret set but empty stops the process.
            **{name.upper(): None for name in UNSET_SETTINGS},
            "REDIS_URL": self.redis_url,
            "RESULT_BACKEND_URL": self.redis_url,
            "KIE_API_KEY": self.api_key,
            **upstream,
            **settings,
        }

    def start_api(
        self,
        sandbox: ManagedProcess | None,
        settings: Mapping[str, str],
        port: int | None = None,
    ) -> ManagedProcess:
        """Start the HTTP app (``uvicorn producers.http:app``, one process) on this stack.

        It needs :attr:`api_token` (``REMIX_API_TOKENS``, as in production) on its job
        routes; its environment is otherwise a worker's (:meth:`worker_env`).

        :param sandbox: the upstream it asks (to confirm an adopted task), if any.
        :param settings: its settings on top.
        :param port: its port on 127.0.0.1; a free one when None.
        """
        env = self.worker_env(sandbox, {"REMIX_API_TOKENS": self.api_token, **settings})
        return self._track(lambda: start_api(env, port, log_path=self._log("api")))

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
    """Point this process (the producer side, and the naive app) at ``url``.

    :raises LaunchError: when the job store still talks to another server; the
        benchmark must never write to a Redis someone else uses.
    """
    configure(redis_url=url, result_backend_url=url, **dict.fromkeys(UNSET_SETTINGS))
    naive_app.conf.update(broker_url=url, result_backend=url)
    port = services().store.redis.connection_pool.connection_kwargs.get("port")
    if port != urlsplit(url).port:
        raise LaunchError(f"the job store talks to port {port}, not to the benchmark's Redis")


def _start_naive_worker(
    env: Mapping[str, str | None], concurrency: int, log_path: Path
) -> ManagedProcess:
    """``celery -A bench.naive worker`` on the naive queue; returns once it is ready."""
    return start_worker(
        env,
        concurrency=concurrency,
        queues=[NAIVE_QUEUE],
        hostname=f"naive-{uuid.uuid4().hex[:8]}@%h",
        log_path=log_path,
        app="bench.naive",
    )


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
