"""A real HTTP receiver for completion webhooks, on 127.0.0.1, for the notify tests.

It records every POST (path, headers, raw body) and answers as the test planned, per
path: a status code, ``"hang"`` (no answer until :meth:`WebhookReceiver.release`, or
until the client gives up), ``("redirect", location)``, ``"huge"`` (a 200 announcing a
gigabyte, sent slowly) or a callable run on the delivery that returns the status.
Unplanned requests get a 200.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: Longest a hanging answer waits for release (the tests end long before).
HANG_LIMIT_S = 120.0


@dataclass(frozen=True)
class Delivery:
    """One request the receiver got."""

    path: str
    #: Header names in lower case.
    headers: dict[str, str]
    body: bytes
    at: float


Answer = Any  # int | "hang" | "huge" | ("redirect", str) | Callable[[Delivery], int]


class WebhookReceiver:
    """See the module docstring. Use as a context manager; ``url(path)`` names an endpoint."""

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self._plans: dict[str, deque[Answer]] = defaultdict(deque)
        self._deliveries: list[Delivery] = []
        self._lock = threading.Lock()
        self._released = threading.Event()
        self.in_flight = 0
        self.most_in_flight = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the test's side

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                receiver._handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self._port}{path}"

    def plan(self, path: str, *answers: Answer) -> None:
        """Answer the next requests to ``path`` with ``answers``, in order."""
        with self._lock:
            self._plans[path].extend(answers)

    def release(self) -> None:
        """End every hanging answer (they close without answering)."""
        self._released.set()

    def deliveries(self, path: str | None = None) -> list[Delivery]:
        with self._lock:
            return [d for d in self._deliveries if path is None or d.path == path]

    # ------------------------------------------------------------------ the server's side

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length)
        delivery = Delivery(
            path=handler.path,
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
            at=time.monotonic(),
        )
        with self._lock:
            self._deliveries.append(delivery)
            plan = self._plans[handler.path]
            answer = plan.popleft() if plan else 200
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            self._answer(handler, answer, delivery)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _answer(self, handler: BaseHTTPRequestHandler, answer: Answer, delivery: Delivery) -> None:
        handler.close_connection = True
        if callable(answer):
            answer = answer(delivery)
        if answer == "hang":
            self._hang(handler.connection)
            return
        if answer == "huge":
            self._send_huge(handler)
            return
        if isinstance(answer, tuple) and answer[0] == "redirect":
            handler.send_response(302)
            handler.send_header("Location", answer[1])
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        payload = b"ok"
        handler.send_response(int(answer))
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def _hang(self, sock: socket.socket) -> None:
        """Answer nothing until released, or until the client gives up (closes)."""
        deadline = time.monotonic() + HANG_LIMIT_S
        while not self._released.wait(0.02) and time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                continue
            try:
                if not sock.recv(1, socket.MSG_PEEK):
                    return
            except OSError:
                return

    def _send_huge(self, handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(10**9))
        handler.end_headers()
        chunk = b"x" * 65536
        deadline = time.monotonic() + 30
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline and not self._released.is_set():
                handler.wfile.write(chunk)
                time.sleep(0.01)


def free_port() -> int:
    """A port nothing listens on now (for a connection refused, then a receiver there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def receiver(port: int = 0) -> Iterator[WebhookReceiver]:
    with WebhookReceiver(port) as server:
        yield server


def loopback_name() -> str | None:
    """A host name (not ``localhost``) that resolves to a loopback address here, if any."""
    for name in (socket.gethostname(), "ip6-localhost", "localhost6"):
        with contextlib.suppress(OSError):
            infos = socket.getaddrinfo(name, 80, proto=socket.IPPROTO_TCP)
            if infos and all(str(i[4][0]).startswith(("127.", "::1")) for i in infos):
                return name
    return None
