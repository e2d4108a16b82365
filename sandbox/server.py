"""The sandbox's HTTP front: a threading server on a loopback address, with raw socket control."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import select
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sandbox.api import INTERNAL_ERROR, Reply, Request, SandboxApi, json_reply
from sandbox.callbacks import CallbackDispatcher
from sandbox.config import SandboxConfig
from sandbox.pages import REASONS

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
LOCALHOST = "localhost"
IDLE_TIMEOUT_S = 60.0
SHUTDOWN_POLL_S = 0.05
STOP_JOIN_TIMEOUT_S = 5.0
LINGER_RESET = struct.pack("ii", 1, 0)


def loopback_host(host: str) -> str:
    """The IPv4 loopback address to bind for ``host``.

    :param host: ``localhost`` or an address in 127.0.0.0/8.
    :raises ValueError: for any other host; the sandbox never listens beyond this machine.
    """
    address = DEFAULT_HOST if host == LOCALHOST else host
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        parsed = None
    if parsed is None or parsed.version != 4 or not parsed.is_loopback:
        raise ValueError(f"the sandbox only listens on loopback addresses, not {host!r}")
    return address


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kie-sandbox"
    timeout = IDLE_TIMEOUT_S
    server: _HttpServer

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def _dispatch(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        request = Request(
            method=self.command,
            path=url.path,
            query=parse_qs(url.query),
            authorization=self.headers.get("Authorization"),
            body=body,
            content_type=self.headers.get("Content-Type"),
        )
        try:
            reply = self.server.api.handle(request)
        except Exception:
            logger.exception("sandbox error on %s %s", self.command, self.path)
            reply = json_reply(INTERNAL_ERROR, {"code": INTERNAL_ERROR, "msg": "sandbox error"})
        self._send(reply)

    def _send(self, reply: Reply) -> None:
        if reply.delay:
            time.sleep(reply.delay)
        if reply.reset:
            self._reset_connection()
            return
        self._send_head(reply)
        self._send_body(reply)

    def _send_head(self, reply: Reply) -> None:
        """The status line and headers; ``Content-Length`` is always the whole body's."""
        self.send_response(reply.status, REASONS.get(reply.status))
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()

    def _send_body(self, reply: Reply) -> None:
        """The body at once or trickled; for a cut, only its first half, then a close."""
        body = reply.body[: len(reply.body) // 2] if reply.cut else reply.body
        if reply.trickle:
            self._trickle(body, reply.trickle)
        else:
            self.wfile.write(body)
        if reply.cut:
            self.close_connection = True

    def _trickle(self, body: bytes, seconds: float) -> None:
        """Write ``body`` a byte at a time, ``seconds`` before each; stop when the client goes."""
        for index in range(len(body)):
            if self._client_gone(seconds):
                self.close_connection = True
                return
            try:
                self.wfile.write(body[index : index + 1])
            except OSError:
                self.close_connection = True
                return

    def _client_gone(self, wait: float) -> bool:
        """Wait ``wait`` seconds, or less when the client closes or resets the connection.

        :returns: whether the client is gone.
        """
        deadline = time.monotonic() + wait
        readable, _, _ = select.select([self.connection], [], [], wait)
        if readable and self._peer_closed():
            return True
        time.sleep(max(0.0, deadline - time.monotonic()))
        return False

    def _peer_closed(self) -> bool:
        """Whether the readable connection is at its end (or reset), without consuming data."""
        try:
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _reset_connection(self) -> None:
        """Close with SO_LINGER (1, 0): the peer gets a TCP RST and no answer."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.connection.close()


class _HttpServer(ThreadingHTTPServer):
    """A threading HTTP server that can cut its open keep-alive connections on stop."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], api: SandboxApi) -> None:
        self.api = api
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down every open client connection, so no handler keeps answering."""
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("connection from %s ended with an error", client_address, exc_info=True)


class SandboxServer:
    """The local kie.ai stand-in: HTTP server, state and callback dispatcher.

    Use ``start()`` to serve from background threads (``with`` works too) or
    ``serve_forever()`` to serve from the calling thread.
    """

    def __init__(
        self, config: SandboxConfig | None = None, host: str = DEFAULT_HOST, port: int = 0
    ) -> None:
        """Bind the listening socket.

        :param config: the starting settings (defaults when None); the server keeps a copy.
        :param host: a loopback address (or ``localhost``).
        :param port: the TCP port; 0 picks a free one.
        :raises ValueError: when ``host`` is not a loopback address.
        :raises OSError: when the port cannot be bound.
        """
        address = loopback_host(host)
        self.api = SandboxApi(config or SandboxConfig())
        self._httpd = _HttpServer((address, port), self.api)
        self.host = address
        self.port: int = self._httpd.server_address[1]
        self.url = f"http://{address}:{self.port}"
        self.api.base_url = self.url
        self._dispatcher = CallbackDispatcher(self.api)
        self._thread: threading.Thread | None = None
        self._serving = False
        self._stopped = False

    @property
    def config(self) -> SandboxConfig:
        """A copy of the current settings."""
        return self.api.config

    def configure(self, **patch: Any) -> SandboxConfig:
        """Merge settings, as ``POST /_sandbox/config`` does.

        :param patch: field name to new value.
        :raises pydantic.ValidationError: when the result is invalid.
        """
        return self.api.configure(patch)

    def stats(self) -> dict[str, Any]:
        """The counters, as ``GET /_sandbox/stats`` serves them."""
        return self.api.stats()

    def reset(self) -> None:
        """Forget tasks and counters, as ``POST /_sandbox/reset`` does."""
        self.api.reset()

    def start(self) -> SandboxServer:
        """Serve from a background daemon thread; return self (a second call does nothing)."""
        if self._thread is None:
            self._serving = True
            self._dispatcher.start()
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                args=(SHUTDOWN_POLL_S,),
                name="sandbox-http",
                daemon=True,
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve from the calling thread until ``stop()`` or an exception (Ctrl-C); then stop."""
        self._serving = True
        self._dispatcher.start()
        try:
            self._httpd.serve_forever(SHUTDOWN_POLL_S)
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop serving, cut open connections and release the port; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self._serving:
            self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()
        self._dispatcher.stop()
        if self._thread is not None:
            self._thread.join(STOP_JOIN_TIMEOUT_S)

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
