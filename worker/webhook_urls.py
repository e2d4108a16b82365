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

MAX_URL_CHARS = 2000
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain"})


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def check_webhook_url(url: str, *, allow_private: bool) -> str:
    """Check a URL as written; returns it, raises ``ValueError`` with a one-line reason."""
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise ValueError(f"must be an http(s) URL of at most {MAX_URL_CHARS} characters")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError:
        raise ValueError("must be an http(s) URL") from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or any(c.isspace() or not c.isprintable() for c in url)
    ):
        raise ValueError("must be an http(s) URL")
    if parts.username or parts.password:
        raise ValueError("must not carry a user name or password")
    if allow_private:
        return url
    host = parts.hostname.rstrip(".").lower()
    if host in _LOCAL_NAMES or host.endswith(".localhost"):
        raise ValueError("points at this machine (set REMIX_NOTIFY_ALLOW_PRIVATE=1 to allow)")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
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
