"""A fake network for the outbound guard's tests: host names, public stand-ins, recorders.

There is no DNS here and no traffic may leave this machine, so :class:`Network` answers
name lookups itself (``socket.getaddrinfo``, per call: a second lookup may answer
differently, as with DNS rebinding) and sees every connection urllib3 tries
(``urllib3.util.connection.create_connection``): a connection to a public stand-in
address goes to a local server instead, one to a loopback address goes there, and
anything else is refused without touching the network. :class:`Recorder` is a real HTTP
server on 127.0.0.1 (TLS too, with a :func:`self_signed` certificate) that counts its
connections and keeps every request's head.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from urllib3.util import connection

#: A public address; a connection to it goes to the local server routed to it.
PUBLIC = "93.184.215.14"

_real_getaddrinfo = socket.getaddrinfo
_real_create_connection = connection.create_connection


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return True


class Network:
    """See the module docstring. Built by the ``network`` fixture."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._answers: dict[str, list[list[str]]] = {}
        self._routes: dict[str, int] = {}
        #: Every name looked up, in order.
        self.lookups: list[str] = []
        #: The host of every connection tried, in order (a name, when urllib3 resolves).
        self.connects: list[str] = []
        monkeypatch.setattr(socket, "getaddrinfo", self._getaddrinfo)
        monkeypatch.setattr(connection, "create_connection", self._create_connection)

    def answer(self, name: str, *answers: list[str]) -> None:
        """The addresses ``name`` resolves to: the first list first, then the next ..."""
        self._answers[name] = list(answers)

    def route(self, address: str, port: int) -> None:
        """Connections to ``address`` go to 127.0.0.1:``port``."""
        self._routes[address] = port

    def resolver(self, host: str, port: int) -> list[str]:
        """A resolver for :class:`worker.net.outbound.Guard`, answering as ``getaddrinfo``."""
        return [str(info[4][0]) for info in self._getaddrinfo(host, port)]

    def _getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and _is_address(host):
            return _real_getaddrinfo(host, port, *args, **kwargs)
        self.lookups.append(str(host))
        answers = self._answers.get(str(host))
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        current = answers.pop(0) if len(answers) > 1 else answers[0]
        return [_info(address, int(port or 0)) for address in current]

    def _create_connection(
        self, address: tuple[str, int], *args: Any, **kwargs: Any
    ) -> socket.socket:
        host, port = address
        self.connects.append(host)
        target = host if _is_address(host) else str(self._getaddrinfo(host, port)[0][4][0])
        if target in self._routes:
            return _real_create_connection(("127.0.0.1", self._routes[target]), *args, **kwargs)
        if ipaddress.ip_address(target.split("%")[0]).is_loopback:
            return _real_create_connection((target, port), *args, **kwargs)
        raise ConnectionRefusedError(f"the test network reaches this machine only, not {target}")


def _info(address: str, port: int) -> tuple[Any, ...]:
    if ":" in address:
        return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> Network:
    return Network(monkeypatch)


@dataclass(frozen=True)
class Seen:
    """One request a recorder got; header names in lower case."""

    path: str
    headers: dict[str, str]


Reply = tuple[int, dict[str, str], bytes]


@dataclass
class Recorder:
    """A real HTTP server on 127.0.0.1; ``replies`` by path (unplanned: 200, empty)."""

    port: int = 0
    replies: dict[str, Reply] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    connections: int = 0

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@contextlib.contextmanager
def recorder(
    replies: dict[str, Reply] | None = None, tls: ssl.SSLContext | None = None
) -> Iterator[Recorder]:
    """Start a :class:`Recorder` (speaking TLS with ``tls``); it stops when the block ends."""
    state = Recorder(replies=dict(replies or {}))
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            with lock:
                state.requests.append(
                    Seen(self.path, {k.lower(): v for k, v in self.headers.items()})
                )
            status, headers, body = state.replies.get(self.path, (200, {}, b""))
            self.send_response(status)
            # One request per connection: a pooled connection never outlives its test.
            head = {"Content-Length": str(len(body)), "Connection": "close", **headers}
            for name, value in head.items():
                self.send_header(name, value)
            self.end_headers()
            self.close_connection = True
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def get_request(self) -> tuple[socket.socket, Any]:
            accepted = super().get_request()
            with lock:
                state.connections += 1
            return accepted

    server = Server(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def redirect_to(location: str) -> Reply:
    return (302, {"Location": location}, b"")


def self_signed(directory: Path, name: str) -> Path:
    """A key and a certificate for the DNS name ``name`` (its own issuer), in one PEM file."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        + certificate.public_bytes(serialization.Encoding.PEM)
    )
    return path
