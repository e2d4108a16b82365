"""Start and stop the processes of a local pipeline: Redis, the sandbox and Celery workers.

Shared by the demo, the test fixtures and the benchmark, so that there is one way to
start a process, wait until it is ready and report why it did not start. Every process
gets its own process group, so stopping one also reaches its children; one started from
the main thread is also killed when this process dies (Linux), so none is left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import NamedTuple
from urllib.parse import quote, urlsplit

import redis

from sandbox.callbacks import is_local_url
from sandbox.control import SandboxControl
from worker.store.connection import connect

LOOPBACK = "127.0.0.1"
DEFAULT_REDIS_PORT = 6379
PROBE_TIMEOUT_S = 0.5
REDIS_START_TIMEOUT_S = 10.0
SANDBOX_START_TIMEOUT_S = 15.0
WORKER_START_TIMEOUT_S = 60.0
API_START_TIMEOUT_S = 30.0
INSPECT_INTERVAL_S = 3.0
INSPECT_TIMEOUT_S = 10.0
POLL_S = 0.1
STOP_TIMEOUT_S = 10.0
KILL_WAIT_S = 5.0
LOG_TAIL_CHARS = 2000
WORKER_READY_MARK = " ready."
REDIS_MISSING = "redis-server is not installed: install Redis (e.g. apt-get install redis-server)"
REPO_ROOT = Path(__file__).resolve().parent.parent
#: The Celery app a worker runs unless told otherwise (``celery -A``).
WORKER_APP = "worker.app"

_Check = Callable[[], bool]
#: prctl(2) option: the signal a process gets when the thread that started it ends.
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class LaunchError(RuntimeError):
    """A process could not be started or did not become ready."""


@dataclass
class ManagedProcess:
    """A started process and how to reach and stop it.

    :param popen: the process (leader of its own process group).
    :param url: the base URL it serves, for the sandbox.
    :param name: the Celery node name, for a worker.
    :param log_path: the file its stdout and stderr go to.
    """

    popen: subprocess.Popen[bytes]
    url: str | None = None
    name: str | None = None
    log_path: Path | None = None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the leader (a Celery warm shutdown), then SIGKILL the group after ``timeout``.

        The pool children of a Celery worker die at once on SIGTERM, so the TERM goes to the
        leader only, which then stops them after the running tasks end.

        :param timeout: seconds to wait for a clean exit.
        :returns: the exit status.
        """
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        return self.kill()

    def kill(self) -> int | None:
        """SIGKILL the whole process group (like ``kill -9``) and reap the leader.

        :returns: the exit status.
        """
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        try:
            return self.popen.wait(KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The end of the process's log, or "" when there is none.

        :param chars: how many characters to return at most.
        """
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def redis_ping(url: str) -> bool:
    """Whether a Redis server answers PING at ``url``.

    :param url: a Redis URL (``redis://``, or ``sentinel://`` for a group's primary).
    """
    client = connect(url, socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


class RedisServer(NamedTuple):
    """A ``redis-server`` started by :func:`start_redis`: the process and its URL."""

    process: ManagedProcess
    url: str


def start_redis(
    port: int | None = None,
    *,
    append_only_dir: str | Path | None = None,
    log_path: str | Path | None = None,
    timeout: float = REDIS_START_TIMEOUT_S,
    password: str | None = None,
    extra_args: Sequence[str] = (),
) -> RedisServer:
    """Start a private ``redis-server`` on 127.0.0.1 and wait until it answers PING.

    :param port: the port to listen on; a free one when None (give the same port and
        ``append_only_dir`` again to restart a server with its data).
    :param append_only_dir: keep every write in an append-only file in this directory
        (fsync on every write); None keeps nothing on disk.
    :param log_path: where its output goes; a temporary file when None.
    :param timeout: seconds to wait for it to answer.
    :param password: its ``requirepass`` (and ``masterauth``, for when it is a replica).
    :param extra_args: further ``redis-server`` options, e.g. ``["--replicaof", ...]``.
    :raises LaunchError: when Redis is not installed, the port is taken, or the server
        exits or does not answer in time (with its log's end).
    """
    if port is not None and _port_open(port):
        raise LaunchError(f"port {port} is already in use; stop what listens there or pick another")
    port = free_port() if port is None else port
    auth = "" if password is None else f":{quote(password, safe='')}@"
    url = f"redis://{auth}{LOOPBACK}:{port}/0"
    data_dir = None if append_only_dir is None else Path(append_only_dir)
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
    command = _redis_command(port, data_dir) + list(extra_args)
    if password is not None:
        command += ["--requirepass", password, "--masterauth", password]
    process = _spawn(command, os.environ, log_path, "remixq-redis-")
    _await_ready(process, lambda: redis_ping(url), timeout, f"redis-server on port {port}")
    return RedisServer(process, url)


def _redis_command(port: int, append_only_dir: Path | None) -> list[str]:
    """The ``redis-server`` command line: loopback only, no snapshots, an AOF when asked."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise LaunchError(REDIS_MISSING)
    command = [executable, "--port", str(port), "--bind", LOOPBACK, "--save", ""]
    if append_only_dir is None:
        return [*command, "--appendonly", "no"]
    command += ["--appendonly", "yes", "--appendfsync", "always"]
    return [*command, "--dir", str(append_only_dir)]


def start_sentinel(
    port: int,
    config: str,
    directory: Path,
    *,
    password: str | None = None,
    timeout: float = REDIS_START_TIMEOUT_S,
) -> RedisServer:
    """Start ``redis-server --sentinel`` on 127.0.0.1 with ``config`` (its ``sentinel``
    lines) and wait until it answers PING.

    Its configuration file (which Sentinel rewrites as it learns) and its log are kept in
    ``directory``. ``password`` is its own ``requirepass``.
    """
    executable = shutil.which("redis-server")
    if executable is None:
        raise LaunchError(REDIS_MISSING)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"sentinel-{port}.conf"
    lines = [f"port {port}", f"bind {LOOPBACK}", f"dir {directory}", config]
    lines += [] if password is None else [f"requirepass {password}"]
    path.write_text("\n".join(lines) + "\n")
    auth = "" if password is None else f":{quote(password, safe='')}@"
    url = f"redis://{auth}{LOOPBACK}:{port}/0"
    log_path = directory / f"sentinel-{port}.log"
    process = _spawn([executable, str(path), "--sentinel"], os.environ, log_path, "")
    _await_ready(process, lambda: redis_ping(url), timeout, f"redis-sentinel on port {port}")
    return RedisServer(process, url)


def ensure_redis(
    url: str, timeout: float = REDIS_START_TIMEOUT_S
) -> subprocess.Popen[bytes] | None:
    """Make sure Redis answers at ``url``, starting a throwaway ``redis-server`` if needed.

    The server started (by :func:`start_redis`) listens on 127.0.0.1 at the URL's port
    and keeps nothing on disk.

    :param url: a ``redis://`` URL; only a local one can be started.
    :param timeout: seconds to wait for a started server to answer.
    :returns: the started server (the caller stops it), or None when one was running.
    :raises LaunchError: when Redis is not installed, the URL is not local, the port is
        taken by something else, or the server does not answer in time.
    """
    if redis_ping(url):
        return None
    port = urlsplit(url).port or DEFAULT_REDIS_PORT
    if not is_local_url(url):
        raise LaunchError(f"no Redis answers at {url}, and only a local one can be started")
    if _port_open(port):
        raise LaunchError(f"port {port} is in use, but no Redis answers PING at {url}")
    if shutil.which("redis-server") is None:
        raise LaunchError(f"{REDIS_MISSING}, or set REDIS_URL to a running server")
    return start_redis(port, timeout=timeout).process.popen


def start_sandbox(
    port: int | None = None,
    *,
    args: Sequence[str] = (),
    log_path: str | Path | None = None,
    timeout: float = SANDBOX_START_TIMEOUT_S,
) -> ManagedProcess:
    """Run ``python -m sandbox`` in its own process and wait until ``/healthz`` answers.

    :param port: the port to listen on; a free one when None.
    :param args: further command-line options, e.g. ``["--fault", "429=0.1"]``.
    :param log_path: where its output goes; a temporary file when None.
    :param timeout: seconds to wait for it to answer.
    :raises LaunchError: when it exits or does not answer in time (with its log's end).
    """
    if port is not None and _port_open(port):
        raise LaunchError(f"port {port} is already in use; stop what listens there or pick another")
    port = free_port() if port is None else port
    command = [sys.executable, "-m", "sandbox", "--port", str(port), *args]
    process = _spawn(command, os.environ, log_path, "remixq-sandbox-")
    process.url = f"http://{LOOPBACK}:{port}"
    control = SandboxControl(process.url)
    try:
        _await_ready(process, control.is_ready, timeout, "sandbox")
    finally:
        control.close()
    return process


def start_worker(
    env: Mapping[str, str | None],
    *,
    concurrency: int | None = 2,
    pool: str | None = None,
    queues: Sequence[str] | None = None,
    hostname: str | None = None,
    log_path: str | Path | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = WORKER_START_TIMEOUT_S,
    app: str = WORKER_APP,
) -> ManagedProcess:
    """Run a Celery worker in its own process group and wait until it is ready.

    :param env: variables added to this process's environment (``REDIS_URL``, ...); one
        whose value is None is removed from it (a secret set but empty is refused).
    :param concurrency: the pool size (``-c``); None: no ``-c``, the settings' size.
    :param pool: the pool implementation (``-P``), e.g. ``prefork`` or ``threads``.
    :param queues: the queues to consume (``-Q``); every queue when None.
    :param hostname: the node name (``-n``); a unique ``remixq-<hex>@%h`` when None.
    :param log_path: where its output goes; a temporary file when None.
    :param extra_args: further worker options.
    :param timeout: seconds to wait for the worker to be ready.
    :param app: the Celery app (``-A``): the pipeline's, or another one such as the
        benchmark's baseline.
    :raises LaunchError: when it exits or is not ready in time (with its log's end).
    """
    name = hostname or f"remixq-{uuid.uuid4().hex[:8]}@%h"
    command = [sys.executable, "-m", "celery", "-A", app, "worker"]
    command += ["--loglevel", "INFO", "-n", name]
    command += ["-c", str(concurrency)] if concurrency is not None else []
    command += ["-P", pool] if pool else []
    command += ["-Q", ",".join(queues)] if queues else []
    command += list(extra_args)
    full_env = _child_env(env)
    log_offset = _size(log_path)
    process = _spawn(command, full_env, log_path, "remixq-worker-")
    process.name = name.replace("%h", socket.gethostname())
    ready = _WorkerReadiness(process, log_offset, full_env, app)
    _await_ready(process, ready.check, timeout, f"worker {process.name}")
    return process


def start_api(
    env: Mapping[str, str | None],
    port: int | None = None,
    *,
    log_path: str | Path | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = API_START_TIMEOUT_S,
) -> ManagedProcess:
    """Run the HTTP app (``uvicorn producers.http:app``) and wait until it serves.

    Ready means ``/healthz`` answers at all: 503 (Redis unreachable) counts, so an app
    pointed at a Redis that is down can be started too.

    :param env: variables added to this process's environment (``REDIS_URL``, ...); one
        whose value is None is removed from it.
    :param port: the port to listen on (127.0.0.1); a free one when None.
    :param log_path: where its output goes; a temporary file when None.
    :param extra_args: further uvicorn options.
    :param timeout: seconds to wait for it to answer.
    :raises LaunchError: when it exits or does not answer in time (with its log's end).
    """
    if port is not None and _port_open(port):
        raise LaunchError(f"port {port} is already in use; stop what listens there or pick another")
    port = free_port() if port is None else port
    command = [sys.executable, "-m", "uvicorn", "producers.http:app"]
    command += ["--host", LOOPBACK, "--port", str(port), *extra_args]
    process = _spawn(command, _child_env(env), log_path, "remixq-api-")
    process.url = f"http://{LOOPBACK}:{port}"
    _await_ready(process, lambda: _http_answers(f"{process.url}/healthz"), timeout, "HTTP app")
    return process


def start_flower(
    env: Mapping[str, str],
    port: int | None = None,
    *,
    basic_auth: str,
    log_path: str | Path | None = None,
    timeout: float = API_START_TIMEOUT_S,
) -> ManagedProcess:
    """Run Flower (``celery -A worker.app flower``) on 127.0.0.1 behind basic auth.

    Flower reads ``flowerconfig.py`` from the repository root (the tasks page's columns).
    It needs no upstream key, so none is passed; ``FLOWER_UNAUTHENTICATED_API`` is removed
    from its environment, so its API answers only with the credentials.

    :param env: variables added to this process's environment (``REDIS_URL``, ...).
    :param basic_auth: ``user:password``.
    :raises LaunchError: when it exits or does not answer in time (with its log's end).
    """
    port = free_port() if port is None else port
    command = [sys.executable, "-m", "celery", "-A", WORKER_APP, "flower"]
    command += [f"--address={LOOPBACK}", f"--port={port}", f"--basic-auth={basic_auth}"]
    full_env = {**os.environ, **env}
    for name in ("FLOWER_UNAUTHENTICATED_API", "KIE_API_KEY"):
        full_env.pop(name, None)
    process = _spawn(command, full_env, log_path, "remixq-flower-")
    process.url = f"http://{LOOPBACK}:{port}"
    _await_ready(process, lambda: _http_answers(f"{process.url}/healthcheck"), timeout, "Flower")
    return process


def _http_answers(url: str) -> bool:
    """Whether an HTTP server answers ``url`` with any status."""
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S * 4):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


class _WorkerReadiness:
    """Whether a worker is ready: its log says so, or ``celery inspect ping`` reaches it."""

    def __init__(
        self, process: ManagedProcess, log_offset: int, env: Mapping[str, str], app: str
    ) -> None:
        self._process = process
        self._app = app
        self._log_offset = log_offset
        self._env = dict(env)
        self._next_inspect = time.monotonic() + INSPECT_INTERVAL_S

    def check(self) -> bool:
        """One look at the log, and now and then one ``inspect ping``."""
        if self._log_says_ready():
            return True
        if time.monotonic() < self._next_inspect:
            return False
        self._next_inspect = time.monotonic() + INSPECT_INTERVAL_S
        return self._inspect_ping()

    def _log_says_ready(self) -> bool:
        path = self._process.log_path
        if path is None or not path.exists():
            return False
        with path.open("rb") as log:
            log.seek(self._log_offset)
            return WORKER_READY_MARK.encode() in log.read()

    def _inspect_ping(self) -> bool:
        command = [sys.executable, "-m", "celery", "-A", self._app, "inspect", "ping"]
        command += ["-d", self._process.name or "", "--timeout", "1"]
        try:
            result = subprocess.run(
                command,
                cwd=_working_dir(),
                env=self._env,
                capture_output=True,
                timeout=INSPECT_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0


def _working_dir() -> Path:
    """The repository root when this file sits in one, else the current directory."""
    return REPO_ROOT if (REPO_ROOT / "pyproject.toml").exists() else Path.cwd()


def _child_env(env: Mapping[str, str | None]) -> dict[str, str]:
    """This process's environment with ``env`` added; a variable given as None is removed."""
    merged = {**os.environ, **env}
    return {name: value for name, value in merged.items() if value is not None}


def _spawn(
    command: list[str], env: Mapping[str, str], log_path: str | Path | None, prefix: str
) -> ManagedProcess:
    """Start ``command`` in a new process group with its output appended to a log file."""
    path = Path(log_path) if log_path is not None else _temporary_log(prefix)
    with path.open("ab") as log:
        popen = subprocess.Popen(
            command,
            cwd=_working_dir(),
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=dies_with_this_process(),
        )
    return ManagedProcess(popen, log_path=path)


def dies_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux SIGKILL the child when this process dies.

    Only for a child started from the main thread (the signal follows the thread that
    started it, and other threads end early); None elsewhere and off Linux.
    """
    if _LIBC is None or threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()
    return lambda: _tie_to(parent)


def die_with_parent() -> None:
    """Have Linux SIGKILL this process when its parent dies (for a process whose starter
    does not arrange it, such as a pytest-xdist worker); nothing off Linux."""
    _tie_to(os.getppid())


def _tie_to(parent: int) -> None:
    """SIGKILL this process when the thread that started it ends; exit at once when
    ``parent`` died before the tie was made."""
    if _LIBC is None:
        return
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _size(path: str | Path | None) -> int:
    """The size of the file at ``path`` in bytes; 0 when there is none."""
    return Path(path).stat().st_size if path is not None and Path(path).exists() else 0


def _temporary_log(prefix: str) -> Path:
    handle, name = tempfile.mkstemp(prefix=prefix, suffix=".log")
    os.close(handle)
    return Path(name)


def _await_ready(process: ManagedProcess, ready: _Check, timeout: float, what: str) -> None:
    """Wait until ``ready()``; kill the process and raise with its log when it exits or is late."""
    try:
        started = _wait_for(lambda: ready() or process.popen.poll() is not None, timeout)
    except BaseException:  # Ctrl-C while waiting: leave nothing running
        process.kill()
        raise
    if started and process.popen.poll() is None:
        return
    status = process.popen.poll()
    process.kill()
    reason = f"exited with status {status}" if status is not None else f"not ready in {timeout:g} s"
    raise LaunchError(f"{what} {reason}; log {process.log_path}:\n{process.log_tail()}")


def _wait_for(condition: _Check, timeout: float) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


def _port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_TIMEOUT_S)
        return probe.connect_ex((LOOPBACK, port)) == 0


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C inside the block, so that cleanup code runs."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
