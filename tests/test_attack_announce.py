"""The task-sent events of new jobs reach Flower whatever the process does next: exit at
once, exit while the announcer thread is sending (to a broker farther than localhost), or
fork."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from tests.conftest import worker_env
from tests.policy_kit import published as _published
from worker.services import Services

# Each test runs a producer process of its own.
pytestmark = pytest.mark.integration


def _run(svc: Services, script: str) -> None:
    env = worker_env(
        "http://127.0.0.1:9",
        REDIS_URL=svc.settings.redis_url,
        RESULT_BACKEND_URL=svc.settings.redis_url,
    )
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)


def test_jobs_announced_shortly_before_exit_are_announced_whatever_the_delay(
    svc: Services,
    events: redis.client.PubSub,
) -> None:
    """The exit may come while the announcer thread is sending (it took the held events)."""
    ids = [uuid.uuid4().hex for _ in range(12)]
    script = (
        "import time\n"
        "from worker.app import services\n"
        "p = services().publisher\n"
        f"for n, job_id in enumerate({ids!r}):\n"
        "    p.announce([(job_id, {'prompt': 'x'})])\n"
        "    if n == len(%r) - 1:\n"
        "        break\n"
        "    time.sleep(0.2)\n"
        "time.sleep(0.05 + 0.0005)\n" % (ids,)
    )
    _run(svc, script)
    seen = [event["uuid"] for _, body in _published(events) for event in body]
    assert sorted(seen) == sorted(ids)


def test_jobs_announced_in_a_forked_child_and_its_parent_are_announced(
    svc: Services,
    events: redis.client.PubSub,
) -> None:
    a, b, c = (uuid.uuid4().hex for _ in range(3))
    script = (
        "import os, sys, time\n"
        "from worker.app import services\n"
        "p = services().publisher\n"
        f"p.announce([({a!r}, {{'prompt': 'a'}})])\n"
        "time.sleep(0.3)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        f"    p.announce([({b!r}, {{'prompt': 'b'}})])\n"
        "    time.sleep(0.3)\n"
        "    sys.exit(0)\n"
        "os.waitpid(pid, 0)\n"
        f"p.announce([({c!r}, {{'prompt': 'c'}})])\n"
        "time.sleep(0.3)\n"
    )
    _run(svc, script)
    seen = [event["uuid"] for _, body in _published(events) for event in body]
    assert sorted(seen) == sorted([a, b, c])


@contextlib.contextmanager
def _slow_link(target: tuple[str, int], delay: float) -> Iterator[int]:
    """A TCP forwarder to ``target`` that delivers every chunk ``delay`` seconds late (a
    broker farther away than localhost); what was sent is delivered even if the sender
    has gone meanwhile."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stopping = threading.Event()

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                due = time.monotonic() + delay
                threading.Thread(target=_deliver, args=(dst, chunk, due), daemon=True).start()
                time.sleep(0)
        time.sleep(delay + 0.05)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    lock = threading.Lock()

    def _deliver(dst: socket.socket, chunk: bytes, due: float) -> None:
        time.sleep(max(0.0, due - time.monotonic()))
        with lock, contextlib.suppress(OSError):
            dst.sendall(chunk)

    def serve() -> None:
        while not stopping.is_set():
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            upstream = socket.create_connection(target)
            threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        stopping.set()
        listener.close()


@pytest.mark.parametrize("exit_after_s", [0.0, 0.08])
def test_jobs_announced_shortly_before_exit_reach_a_broker_farther_than_localhost(
    svc: Services,
    events: redis.client.PubSub,
    exit_after_s: float,
) -> None:
    """The process exits 80 ms after announcing (a CLI printing its answer), the broker
    is 150 ms away: the announcer thread has taken the held events and is connecting when
    the exit's flush finds nothing held; the interpreter then ends the daemon thread."""
    job_id = uuid.uuid4().hex
    parts = urlsplit(svc.settings.redis_url)
    with _slow_link((parts.hostname or "127.0.0.1", parts.port or 6379), 0.15) as port:
        slow = urlunsplit((parts.scheme, f"127.0.0.1:{port}", parts.path, "", ""))
        env = worker_env("http://127.0.0.1:9", REDIS_URL=slow, RESULT_BACKEND_URL=slow)
        script = (
            "import time\n"
            "from worker.app import services\n"
            f"services().publisher.announce([({job_id!r}, {{'prompt': 'last words'}})])\n"
            f"time.sleep({exit_after_s})\n"
        )
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
        time.sleep(1.0)
    seen = [event["uuid"] for _, body in _published(events) for event in body]
    assert seen == [job_id]
