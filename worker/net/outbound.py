"""The one guard for every outbound fetch of a URL that comes from outside.

Webhook URLs come from producers, result URLs from the upstream, and a worker fetches
them from inside the operator's network. Through :func:`session`, every request (each
redirect hop too) is checked as written (:func:`check_url`), its host is resolved once,
every address must be public (:func:`is_public`; :data:`REFUSED_NETWORKS` lists what is
not), and the socket connects to an address so checked, never to another resolution's
answer, while the Host header, TLS SNI and the certificate check keep the name. A
refusal (:class:`Refused`) is raised before any connection is tried, so it says nothing
about internal ports. No proxy and no ``.netrc`` is used; requests honour
:func:`worker.net.deadline.deadline`. Private addresses are reached only through a guard built
with ``allow_private`` (development and tests: the sandbox is on 127.0.0.1).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

import requests
from requests.adapters import BaseAdapter, HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import connection

from worker.models import check_http_url
from worker.net import deadline

#: The text of every refusal of an address.
REFUSED = "refused: not a public address"
#: The longest URL fetched: signed result URLs can be long, and servers commonly take 8 KiB.
MAX_URL_CHARS = 8192
#: Connection pools kept per session (one per checked host, port and addresses).
MAX_POOLS = 16
_DEFAULT_PORTS = {"http": 80, "https": 443}
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain"})
#: What IDNA reads as a label separator besides ".".
_IDNA_DOTS = ("\u3002", "\uff0e", "\uff61")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: ``(host, port) -> addresses``: how a guard resolves a name (tests pass their own).
Resolver = Callable[[str, int], Sequence[str]]

#: Networks no fetch may reach unless private addresses are allowed. An address must also
#: be global (``is_global``); an IPv6 one must be global unicast (2000::/3) or carry a
#: public IPv4 address (NAT64, 6to4, IPv4-mapped).
REFUSED_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
    ipaddress.ip_network(network)
    for network in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",  # private
        "100.64.0.0/10",  # shared address space (carrier-grade NAT)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local: cloud metadata services
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, the broadcast address included
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): not global, its IPv4 placed anywhere
        "::/128",  # unspecified
        "::1/128",  # loopback
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments, Teredo included
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
        "fc00::/7",  # unique-local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated; Python 3.11 calls it global)
        "ff00::/8",  # multicast
    )
)
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
#: IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64, IPv4-compatible,
#: IPv4-translated): a gateway may turn them into that IPv4 address.
_EMBEDDING_PREFIXES = tuple(
    ipaddress.ip_network(prefix) for prefix in ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96")
)


class OutboundError(Exception):
    """A fetch the guard stopped; ``str()`` is one line without the URL."""


class BadURL(OutboundError):
    """The URL as written cannot be fetched (not http(s), a user name, too long ...)."""


class Refused(OutboundError):
    """The host is, or resolves to, an address that is not public."""

    def __init__(self) -> None:
        super().__init__(REFUSED)


class Unresolved(OutboundError):
    """The host name does not resolve (now: a later try may succeed)."""


class TooLarge(OutboundError):
    """The answer's body is larger than the caller allows."""


# ------------------------------------------------------------------ addresses


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address may stand for (mapped, 6to4, NAT64 ...)."""
    found = [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    if any(address in network for network in _EMBEDDING_PREFIXES):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def is_public(address: IPAddress) -> bool:
    """Whether a fetch may reach ``address`` (see :data:`REFUSED_NETWORKS`)."""
    if any(address in network for network in REFUSED_NETWORKS):
        return False
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded:
            return all(is_public(inner) for inner in embedded)
        return address in _GLOBAL_UNICAST and address.is_global
    return address.is_global


def _parse_address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None


def _literal_address(host: str) -> IPAddress | None:
    """The address a host written as a number stands for, as resolvers read it.

    Besides the usual forms, ``inet_aton`` accepts IPv4 shorthand (``127.1``, ``0``,
    ``2130706433``, ``0x7f.1``), which every resolver honours: None for a real name.
    """
    address = _parse_address(host)
    if address is not None:
        return address
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _names_this_machine(host: str) -> bool:
    return host in _LOCAL_NAMES or host.endswith(".localhost")


def _plain_host(host: str) -> str:
    """``host`` as IDNA reads it (``ⓛⓞⓒⓐⓛⓗⓞⓢⓣ``, ``127。0。0。1``), lower case, no final dot."""
    plain = unicodedata.normalize("NFKC", host).lower()
    for dot in _IDNA_DOTS:
        plain = plain.replace(dot, ".")
    return plain.rstrip(".")


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to, in the resolver's order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# ------------------------------------------------------------------ the checks


def check_url(url: str, *, allow_private: bool, max_chars: int = MAX_URL_CHARS) -> SplitResult:
    """Check a URL as written, without resolving it; returns its parts.

    Raises :class:`BadURL`, or :class:`Refused` for a host that names this machine or is
    an address that is not public (unless ``allow_private``).
    """
    if not isinstance(url, str):
        raise BadURL("not an http(s) URL")
    if len(url) > max_chars:
        raise BadURL(f"a URL of more than {max_chars} characters")
    if not url.isprintable():
        raise BadURL("a URL with a control character")
    try:
        check_http_url(url)
    except ValueError:
        raise BadURL("not an http(s) URL") from None
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise BadURL("a URL with a user name or password")
    host = _plain_host(parts.hostname or "")
    if not allow_private:
        address = _literal_address(host)
        if _names_this_machine(host) or (address is not None and not is_public(address)):
            raise Refused()
    return parts


@dataclass(frozen=True)
class Destination:
    """Where one request goes: the name it was written with and the addresses checked."""

    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class Guard:
    """What may be fetched: public addresses only, unless ``allow_private``."""

    allow_private: bool = False
    resolver: Resolver = system_resolver

    def resolve(self, url: str) -> Destination:
        """Check ``url``, resolve its host once, and check every address.

        Raises :class:`BadURL`, :class:`Refused` or :class:`Unresolved`.
        """
        parts = check_url(url, allow_private=self.allow_private)
        host = parts.hostname or ""
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
        literal = _literal_address(host)
        addresses = [str(literal)] if literal is not None else self._lookup(host, port)
        if not self.allow_private:
            for text in addresses:
                address = _parse_address(text)
                if address is None or not is_public(address):
                    raise Refused()
        return Destination(parts.scheme, host, port, tuple(addresses))

    def _lookup(self, host: str, port: int) -> list[str]:
        try:
            addresses = list(self.resolver(host, port))
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise Unresolved(f"cannot resolve the host ({reason})") from None
        if not addresses:
            raise Unresolved("cannot resolve the host (no address)")
        return addresses


# ------------------------------------------------------------------ connections


class _PinnedMixin:
    """Connects to the checked addresses, in order, and never resolves the name again."""

    port: int
    timeout: Any
    source_address: tuple[str, int] | None
    socket_options: Any

    def __init__(self, *args: Any, addresses: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.addresses = addresses

    def _new_conn(self) -> socket.socket:
        error: OSError = OSError("no address")
        for address in self.addresses:
            try:
                return connection.create_connection(
                    (address, self.port),
                    self.timeout,
                    source_address=self.source_address,
                    socket_options=self.socket_options,
                )
            except OSError as exc:
                error = exc
        if isinstance(error, TimeoutError):
            raise ConnectTimeoutError(self, f"connect timed out ({self.timeout} s)") from error
        raise NewConnectionError(self, f"cannot connect: {error}") from error  # type: ignore[arg-type]


class _PinnedHTTPConnection(_PinnedMixin, deadline.GuardedHTTPConnection):
    pass


class _PinnedHTTPSConnection(_PinnedMixin, deadline.GuardedHTTPSConnection):
    pass


class _PinnedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _PinnedHTTPConnection


class _PinnedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPSConnection


class _GuardAdapter(HTTPAdapter):
    """Checks each request's destination, then hands out a pool bound to its addresses."""

    def __init__(self, guard: Guard) -> None:
        super().__init__()
        self._guard = guard
        self._pools: OrderedDict[Destination, HTTPConnectionPool] = OrderedDict()
        self._lock = threading.Lock()

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: bool | str | None,
        proxies: Mapping[str, str] | None = None,
        cert: Any = None,
    ) -> HTTPConnectionPool:
        return self._pool(self._guard.resolve(request.url or ""))

    def request_url(
        self, request: requests.PreparedRequest, proxies: Mapping[str, str] | None
    ) -> str:
        return request.path_url  # never the absolute form a proxy would get

    def _pool(self, destination: Destination) -> HTTPConnectionPool:
        with self._lock:
            pool = self._pools.pop(destination, None)
            if pool is None:
                kind = _PinnedHTTPSPool if destination.scheme == "https" else _PinnedHTTPPool
                pool = kind(destination.host, destination.port, addresses=destination.addresses)
            self._pools[destination] = pool
            while len(self._pools) > MAX_POOLS:
                self._pools.popitem(last=False)[1].close()
            return pool

    def close(self) -> None:
        super().close()
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()


class _GuardedSession(requests.Session):
    def __init__(self, guard: Guard) -> None:
        super().__init__()
        self.trust_env = False  # no proxy, .netrc or CA bundle from the environment
        self._guard = guard
        adapter = _GuardAdapter(guard)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def get_adapter(self, url: str) -> BaseAdapter:
        check_url(url, allow_private=self._guard.allow_private)  # a file:// redirect too
        return super().get_adapter(url)


def session(guard: Guard) -> requests.Session:
    """A ``requests`` session whose every request passes ``guard`` (see the module)."""
    return _GuardedSession(guard)


_local = threading.local()


def thread_session(guard: Guard) -> requests.Session:
    """This thread's session for ``guard`` (one per greenlet under gevent)."""
    sessions: dict[Guard, requests.Session] = _local.__dict__.setdefault("sessions", {})
    found = sessions.get(guard)
    if found is None:
        found = sessions[guard] = session(guard)
    return found


def read_capped(response: requests.Response, max_bytes: int) -> bytes:
    """A streamed answer's body; :class:`TooLarge` as soon as it passes ``max_bytes``."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise TooLarge(f"{length} bytes is more than the {max_bytes} bytes allowed")
    data = bytearray()
    for chunk in response.iter_content(min(64 * 1024, max_bytes + 1)):
        data += chunk
        if len(data) > max_bytes:
            raise TooLarge(f"more than the {max_bytes} bytes allowed")
    return bytes(data)
