"""HTTP sessions whose requests have a total deadline, not only per-read timeouts.

``requests`` (and urllib3 under it) bound each socket operation: a server that sends one
byte every few seconds keeps a request alive for as long as it likes. A createTask
request must end well within the job's lease (``worker.settings.Settings.lease_s``), or
another worker could decide its outcome is unknown while it is still running. No
maintained client offers a hard total deadline for blocking calls that works in prefork,
thread and gevent pools alike, hence this small piece:

* the session's connections register themselves with the request being made
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

import requests
from requests.adapters import HTTPAdapter
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


class _Reaper:
    """A daemon thread that expires deadlines in time order."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._counter = itertools.count()
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="remixq-deadlines", daemon=True)
        self._thread.start()

    def watch(self, item: Deadline) -> None:
        with self._wake:
            heapq.heappush(self._heap, (item.at, next(self._counter), item))
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._heap:
                    self._wake.wait()
                at, _, item = self._heap[0]
                wait = at - time.monotonic()
                if wait > 0:
                    self._wake.wait(wait)
                    continue
                heapq.heappop(self._heap)
            if not item.done:
                item.expire()


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


class _GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _GuardedHTTPPool,
            "https": _GuardedHTTPSPool,
        }


def guarded_session() -> requests.Session:
    """A ``requests`` session whose requests honour :func:`deadline`."""
    session = requests.Session()
    adapter = _GuardedAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
