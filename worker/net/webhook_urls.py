"""Which URLs a completion webhook may be sent to.

A producer names the URL, and a worker inside the operator's network sends to it, so a
URL that points at a private or loopback address (a metadata service, an admin port) is
refused unless ``REMIX_NOTIFY_ALLOW_PRIVATE`` says otherwise. The check is made three
times: at enqueue on the URL as written; before each delivery on every address its host
resolves to (a public name may resolve to a private address); and on the address the
delivery's socket actually connected to (:func:`check_peer`), before a byte is sent, so a
name that resolves to another address the second time (DNS rebinding) is refused too.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from worker.models import check_http_url

MAX_URL_CHARS = 2000
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain"})


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64, IPv4-compatible,
#: IPv4-translated): a gateway may turn them into that IPv4 address.
_EMBEDDING_PREFIXES = tuple(
    ipaddress.ip_network(prefix)
    for prefix in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96", "::ffff:0:0:0/96")
)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address may stand for (mapped, 6to4, Teredo, NAT64 ...)."""
    found = [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    if address.teredo is not None:
        found += list(address.teredo)
    if any(address in network for network in _EMBEDDING_PREFIXES):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def _is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded:
            return all(_is_public(inner) for inner in embedded)
    return address.is_global and not address.is_multicast


def _literal_address(host: str) -> IPAddress | None:
    """The address a host written as a number stands for, as resolvers read it.

    Besides the usual forms, ``inet_aton`` accepts IPv4 shorthand (``127.1``, ``0``,
    ``2130706433``, ``0x7f.1``), which every resolver honours: None for a real name.
    """
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def check_webhook_url(url: str, *, allow_private: bool) -> str:
    """Check a URL as written; returns it, raises ``ValueError`` with a one-line reason."""
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise ValueError(f"must be an http(s) URL of at most {MAX_URL_CHARS} characters")
    check_http_url(url)
    if not url.isprintable():
        raise ValueError("must be an http(s) URL")
    parts = urlsplit(url)
    if parts.hostname is None:
        raise ValueError("must be an http(s) URL")
    if parts.username or parts.password:
        raise ValueError("must not carry a user name or password")
    if allow_private:
        return url
    host = parts.hostname.rstrip(".").lower()
    if host in _LOCAL_NAMES or host.endswith(".localhost"):
        raise ValueError("points at this machine (set REMIX_NOTIFY_ALLOW_PRIVATE=1 to allow)")
    address = _literal_address(host)
    if address is None:
        return url  # a name: its addresses are checked before each delivery
    if not _is_public(address):
        raise ValueError(
            "points at a private or loopback address (set REMIX_NOTIFY_ALLOW_PRIVATE=1 to allow)"
        )
    return url


def check_resolved(url: str, *, allow_private: bool) -> None:
    """Before a delivery: every address the host resolves to must be public (unless allowed).

    Raises ``ValueError`` (refused) or ``OSError`` (the name does not resolve).
    """
    check_webhook_url(url, allow_private=allow_private)
    if allow_private:
        return
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for info in socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP):
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not _is_public(address):
            raise ValueError("resolves to a private or loopback address")


class AddressRefused(ValueError):
    """A delivery's socket connected to an address webhooks may not be sent to."""


def check_peer(address: str, *, allow_private: bool) -> None:
    """Refuse a connected peer address that is not public (unless allowed).

    Raises :class:`AddressRefused`.
    """
    if allow_private:
        return
    if not _is_public(ipaddress.ip_address(address.split("%")[0])):
        raise AddressRefused("connected to a private or loopback address")
