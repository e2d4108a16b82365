"""Small helpers shared by the integration tests."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from sandbox.control import SandboxControl
from sandbox.launch import redis_ping
from worker import keys
from worker.fields import PRIORITIES
from worker.store.jobs import decode_text

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.1) -> T:
    """Return the first truthy value of ``predicate()``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def create_requests(control: SandboxControl, prompt: str) -> int:
    """createTask requests the sandbox received for ``prompt`` (faulted ones included)."""
    return int(control.stats()["create_requests_by_prompt"].get(prompt, 0))


def accepted(control: SandboxControl, prompt: str) -> int:
    """Upstream tasks the sandbox created (and would charge) for ``prompt``."""
    return int(control.stats()["accepted_by_prompt"].get(prompt, 0))


@contextlib.contextmanager
def empty_database(url: str, who: str, *, empty_after: bool = True) -> Iterator[redis.Redis]:
    """A client of the Redis database at ``url``, emptied first (and after, by default).

    Fails the test with a clear reason when no Redis answers there.
    """
    if not redis_ping(url):
        pytest.fail(f"{who} need Redis at {url} (see README)")
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield client
    finally:
        if empty_after:
            client.flushdb()
        client.close()


@contextlib.contextmanager
def raw_http_server(
    answer: Callable[[socket.socket], None], *, concurrent: bool = False
) -> Iterator[str]:
    """A one-thread HTTP server on 127.0.0.1 whose every answer is written by ``answer``.

    For answers no well-behaved server gives (odd charsets, connection-delimited bodies
    sent slowly). ``answer`` gets the connected socket after the request was read; with
    ``concurrent``, each connection is answered in a thread of its own. Yields the base URL.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stopping = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if concurrent:
                threading.Thread(target=handle, args=(conn,), daemon=True).start()
            else:
                handle(conn)

    def handle(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                read_request(conn)
                answer(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stopping.set()
        listener.close()
        thread.join(5)


def read_request(conn: socket.socket) -> bool:
    """Read one request, head and body, off ``conn``; False when the client closed it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return False
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        body += conn.recv(4096)
    return True


class TaskRecordHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with a task record (:data:`TASK_RECORD`) and keeps its request
    line and headers in ``seen`` (give each server a subclass with a list of its own)."""

    seen: list[tuple[str, dict[str, str]]]

    def do_GET(self) -> None:
        self.seen.append((self.path, dict(self.headers.items())))
        body = json.dumps(TASK_RECORD).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@contextlib.contextmanager
def task_record_server(
    wrap: Callable[[socket.socket], socket.socket] | None = None,
) -> Iterator[tuple[str, list[tuple[str, dict[str, str]]]]]:
    """A :class:`TaskRecordHandler` server on 127.0.0.1: ``(its URL, what it saw)``.

    :param wrap: turns the listening socket into another (a TLS one, say).
    """
    seen: list[tuple[str, dict[str, str]]] = []
    handler = type("Handler", (TaskRecordHandler,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if wrap is not None:
        server.socket = wrap(server.socket)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    scheme = "http" if wrap is None else "https"
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


#: A recordInfo answer: task ``t1``, still generating.
TASK_RECORD = {"code": 200, "msg": "success", "data": {"taskId": "t1", "state": "generating"}}


def redis_value(client: redis.Redis, key: bytes) -> bytes:
    """Everything a key holds, as text to search (for secrets that must not be there)."""
    readers = {
        b"string": client.get,
        b"hash": client.hgetall,
        b"list": lambda k: client.lrange(k, 0, -1),
        b"set": client.smembers,
        b"zset": lambda k: client.zrange(k, 0, -1),
    }
    kind = client.type(key)
    reader = readers.get(kind.encode() if isinstance(kind, str) else kind)
    return repr(reader(key)).encode() if reader else b""


def whole_png(padding: int = 200) -> bytes:
    """A structurally complete PNG (signature, IHDR, IDAT, a ``tEXt`` of ``padding`` bytes,
    IEND): what the archive's completeness check accepts."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    pixels = zlib.compress(b"".join(b"\x00" + b"\x7f" * 3 * 32 for _ in range(32)))
    header = struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", pixels)
        + chunk(b"tEXt", b"c\x00" + b"x" * padding)
        + chunk(b"IEND", b"")
    )


def start_snapshot_redis(port: int, directory: Path, *args: str) -> subprocess.Popen[bytes]:
    """A redis-server on 127.0.0.1 that keeps only what a ``SAVE`` writes to ``directory``
    (and loads it again when started there again); waits until it answers. ``args``: more
    of its command line options."""
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "no",
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: redis_ping(f"redis://127.0.0.1:{port}/0"), 10)
    except BaseException:
        process.kill()
        raise
    return process


def waiting_jobs(client: redis.Redis) -> list[dict[str, Any]]:
    """The jobs waiting in every provider's lines for a send moment, by place: what a
    producer's enqueue leaves (no message is sent before a send moment picks the job).
    Each: ``job_id``, ``request``, ``provider``, ``tenant``, ``priority``."""
    placed: list[tuple[float, str]] = []
    for key in client.scan_iter(match=keys.LINES_PREFIX + "*:*:*"):
        _provider, priority, _tenant = decode_text(key).removeprefix(keys.LINES_PREFIX).split(":")
        if priority in PRIORITIES:
            line = client.zrange(key, 0, -1, withscores=True)
            placed += [(score, decode_text(member)) for member, score in line]
    jobs = []
    for _, job_id in sorted(placed):
        fields = client.hmget(keys.job(job_id), "_request", "provider", "tenant", "priority")
        request, provider, tenant, priority = (json.loads(v) if v else None for v in fields)
        jobs.append(
            {
                "job_id": job_id,
                "request": request,
                "provider": provider or "kie",
                "tenant": tenant or "default",
                "priority": priority or "normal",
            }
        )
    return jobs
