"""HTTP sessions whose requests have a total deadline, not only per-read timeouts.

urllib3 (and ``requests`` over it) bounds each socket operation: a server that sends one
byte every few seconds keeps a request alive for as long as it likes. A createTask
request must end well within the job's lease (``worker.settings.Settings.lease_s``), or
another worker could decide its outcome is unknown while it is still running. No
maintained client offers a hard total deadline for blocking calls that works in prefork,
thread and gevent pools alike, hence this small piece:

* the connections of :class:`UpstreamSession` (the upstream clients' session) and of the
  outbound guard register themselves with the request being made
  (:class:`_GuardedConnectionMixin`), and
* one daemon thread per process (:class:`_Reaper`) shuts down the socket of any request
  still running at its deadline, which makes the blocked read fail at once.

Use :func:`deadline` around the whole request, body included, and check
:attr:`Deadline.expired` to tell a deadline from another broken connection.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import urllib3
from requests.utils import (
    DEFAULT_CA_BUNDLE_PATH,
    get_auth_from_url,
    get_environ_proxies,
    prepend_scheme_if_needed,
)
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_active = threading.local()


class Deadline:
    """One request's deadline and the sockets it used.

    The sockets themselves are kept, not their connections: for an answer delimited by
    closing the connection, ``http.client`` lets go of the connection's socket while the
    answer is still being read from it.
    """

    def __init__(self, at: float) -> None:
        self.at = at
        self.expired = False
        self.done = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def attach(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets.append(sock)

    def expire(self) -> None:
        """Cut every socket of the request (called by the reaper at the deadline)."""
        with self._lock:
            if self.done:
                return
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        with self._lock:
            self.done = True


#: A deadline may be cut this much late, so that one wake of the reaper ends (or forgets)
#: every request whose deadline came meanwhile, not one wake per request.
REAP_SLACK_S = 0.1


class _Reaper:
    """A daemon thread that expires deadlines in time order.

    It sleeps until the earliest deadline (plus :data:`REAP_SLACK_S`) and is woken only
    by a deadline earlier than every other: with one deadline for every request, that is
    rare, so a busy process's requests do not each wake it (and take the GIL from them).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._counter = itertools.count()
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="remixq-deadlines", daemon=True)
        self._thread.start()

    def watch(self, item: Deadline) -> None:
        with self._wake:
            heapq.heappush(self._heap, (item.at, next(self._counter), item))
            if self._heap[0][2] is item:
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._heap:
                    self._wake.wait()
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._wake.wait(wait + REAP_SLACK_S)
                    continue
                due = self._pop_due()
            for item in due:
                if not item.done:
                    item.expire()

    def _pop_due(self) -> list[Deadline]:
        now = time.monotonic()
        due = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap)[2])
        return due


_reaper: _Reaper | None = None
_reaper_pid = 0
_reaper_lock = threading.Lock()


def _get_reaper() -> _Reaper:
    """The process's reaper; a forked child starts its own (threads do not survive a fork)."""
    global _reaper, _reaper_pid
    with _reaper_lock:
        if _reaper is None or _reaper_pid != os.getpid():
            _reaper, _reaper_pid = _Reaper(), os.getpid()
        return _reaper


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[Deadline]:
    """Cut the requests made in this block (by guarded sessions) after ``seconds``."""
    item = Deadline(time.monotonic() + seconds)
    previous = getattr(_active, "deadline", None)
    _active.deadline = item
    _get_reaper().watch(item)
    try:
        yield item
    finally:
        item.finish()
        _active.deadline = previous


class _GuardedConnectionMixin:
    """Hands the connection's socket to the current deadline: a reused one when a
    request starts, a new one as soon as it is connected."""

    sock: socket.socket | None

    def _new_conn(self) -> socket.socket:
        # At once, before a proxy's tunnel is set up over it: a proxy that answers its
        # CONNECT slowly is cut at the deadline too.
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        _attach(sock)
        return sock

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        _attach(self.sock)

    def request(self, *args: Any, **kwargs: Any) -> Any:
        _attach(self.sock)
        return super().request(*args, **kwargs)  # type: ignore[misc]


def _attach(sock: socket.socket | None) -> None:
    current: Deadline | None = getattr(_active, "deadline", None)
    if current is not None:
        current.attach(sock)


class GuardedHTTPConnection(_GuardedConnectionMixin, HTTPConnection):
    """An HTTP connection that honours :func:`deadline` (a base for other connections)."""


class GuardedHTTPSConnection(_GuardedConnectionMixin, HTTPSConnection):
    """An HTTPS connection that honours :func:`deadline` (a base for other connections)."""


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = GuardedHTTPSConnection


class UpstreamSession:
    """Requests to an upstream over urllib3 pools whose connections honour :func:`deadline`.

    urllib3 directly, not ``requests``: for the small JSON requests of a busy worker,
    ``requests``' cookie, hook and settings merging per request was a sixth of a worker
    process's time. What of it the upstreams need is kept: the environment's proxy
    (``HTTP(S)_PROXY``, ``NO_PROXY``) and CA bundle (``REQUESTS_CA_BUNDLE``,
    ``CURL_CA_BUNDLE``, else certifi's), read once for each ``scheme://host:port``; never
    ``~/.netrc``, whose login would replace the bearer token; no retry and no redirect
    followed (the caller decides both).
    """

    def __init__(self) -> None:
        #: Sent with every request (the bearer token lives here only).
        self.headers: dict[str, str] = {}
        self._managers: dict[str, urllib3.PoolManager] = {}

    def request(
        self,
        method: str,
        url: str,
        *,
        timeout: tuple[float, float],
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """Send one request; the answer's body is left to read (``preload_content`` off)."""
        return self._manager_for(url).urlopen(
            method,
            url,
            body=body,
            headers={**self.headers, **(headers or {})},
            retries=False,
            redirect=False,
            timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
            preload_content=False,
            decode_content=True,
        )

    def close(self) -> None:
        for manager in self._managers.values():
            manager.clear()
        self._managers.clear()

    def _manager_for(self, url: str) -> urllib3.PoolManager:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        manager = self._managers.get(origin)
        if manager is None:
            manager = self._managers[origin] = _pool_manager(url, parts.scheme)
        return manager


def _pool_manager(url: str, scheme: str) -> urllib3.PoolManager:
    """The pools for ``url``'s origin: through the environment's proxy for it, if any."""
    bundle = (
        os.environ.get("REQUESTS_CA_BUNDLE")
        or os.environ.get("CURL_CA_BUNDLE")
        or DEFAULT_CA_BUNDLE_PATH
    )
    # A bundle may be a file or a directory of hashed certificates, as requests takes it.
    trust: dict[str, Any] = (
        {"ca_cert_dir": bundle} if os.path.isdir(bundle) else {"ca_certs": bundle}
    )
    proxies = get_environ_proxies(url)
    proxy = proxies.get(scheme) or proxies.get("all")
    manager: urllib3.PoolManager
    if proxy:
        proxy = prepend_scheme_if_needed(
            proxy, "http"
        )  # "host:port" means http://, as requests reads it
        username, password = get_auth_from_url(proxy)
        auth = urllib3.make_headers(proxy_basic_auth=f"{username}:{password}") if username else {}
        manager = urllib3.ProxyManager(
            proxy, proxy_headers=auth, cert_reqs="CERT_REQUIRED", **trust
        )
    else:
        manager = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", **trust)
    manager.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}
    return manager
