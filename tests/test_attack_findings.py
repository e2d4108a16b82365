"""Findings of the attack on the fixes for issue 14: each test fails on the code it was found in.

1. The upstream clients (kie.ai, its upload API, the relay: ``call_upstream``) follow any
   redirect an upstream answers, to any address, outside the outbound guard; the body of
   what the redirect pointed at is quoted in the error, which reaches the job's public
   ``fail_msg``. A hostile or compromised upstream (or relay) can so read internal HTTP
   endpoints through the workers.
2. The outbound guard takes an address in the local-use NAT64 prefix ``64:ff9b:1::/48``
   (RFC 8215: not globally reachable) as public whenever its last 32 bits are a public
   IPv4 address, although a /48 translator (RFC 6052 layout) reads the IPv4 address from
   bits 48..88: ``64:ff9b:1:7f00:0:100:808:808`` stands for 127.0.0.1.
3. ``KIE_CALLBACK_URL`` is checked with ``urlsplit``, which reads
   ``http://example.com\\@localhost/cb`` as a loopback host; urllib3 (requests) and WHATWG
   parsers read ``example.com``: a plain-http callback URL outside loopback passes.

Only 127.0.0.1 is ever connected to.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import threading
from collections.abc import Iterator

import pytest
import urllib3
from pydantic import SecretStr

from producers.api import InvalidRequestError, check_notify_url
from worker.net import outbound
from worker.settings import ConfigurationError, load_settings
from worker.upstreams.errors import UpstreamError
from worker.upstreams.kie import KieClient

INTERNAL_MARK = "INTERNAL-ONLY-7d41"


@contextlib.contextmanager
def _server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def _internal_service() -> Iterator[tuple[str, list[str]]]:
    """An endpoint only the workers' network reaches (here: another port of 127.0.0.1)."""
    hits: list[str] = []

    class Internal(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _answer(self) -> None:
            hits.append(f"{self.command} {self.path}")
            body = f"{INTERNAL_MARK} role=worker secret_access_key=AKIAEXAMPLE".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

    with _server(Internal) as url:
        yield url, hits


@contextlib.contextmanager
def _redirecting_upstream(target: str, status: int) -> Iterator[str]:
    """An upstream whose every answer is a redirect to ``target``."""

    class Upstream(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            self.send_response(status)
            self.send_header("Location", target + "/latest/meta-data/iam")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = _answer

    with _server(Upstream) as url:
        yield url


@pytest.mark.parametrize("status", [302, 307])
@pytest.mark.parametrize("call", ["record_info", "create_task"])
def test_an_upstream_redirect_is_not_followed_to_another_address(status: int, call: str) -> None:
    """Finding 1: an upstream's redirect makes the worker fetch an internal endpoint and
    quote its body in the error (which the poll step stores in the job's ``fail_msg``)."""
    with _internal_service() as (internal, hits), _redirecting_upstream(internal, status) as up:
        client = KieClient(up, SecretStr("sk-attack-finding-1"), request_deadline=5)
        try:
            with pytest.raises(UpstreamError) as caught:
                if call == "record_info":
                    client.record_info("task-1")
                else:
                    client.create_task({"prompt": "x"})
        finally:
            client.close()

    assert hits == [], f"the worker fetched the internal endpoint: {hits}"
    assert INTERNAL_MARK not in str(caught.value)


def _nat64_local_use(ipv4: str) -> ipaddress.IPv6Address:
    """``ipv4`` in 64:ff9b:1::/48 as RFC 6052 lays it out for a /48 prefix (bits 48..88,
    skipping the u octet), with a public IPv4 address (8.8.8.8) in the last 32 bits."""
    packed = bytearray(16)
    packed[0:6] = ipaddress.IPv6Address("64:ff9b:1::").packed[0:6]
    inner = ipaddress.IPv4Address(ipv4).packed
    packed[6:8], packed[9:11] = inner[0:2], inner[2:4]
    packed[12:16] = ipaddress.IPv4Address("8.8.8.8").packed
    return ipaddress.IPv6Address(bytes(packed))


@pytest.mark.parametrize("ipv4", ["127.0.0.1", "169.254.169.254", "10.0.0.5"])
def test_the_guard_refuses_the_local_use_nat64_prefix(ipv4: str) -> None:
    """Finding 2: 64:ff9b:1::/48 is not globally reachable (RFC 8215); the guard lets an
    address there pass when its last 32 bits are public, and a webhook worker connects."""
    address = _nat64_local_use(ipv4)
    url = f"http://[{address}]/hook"

    assert not outbound.is_public(address)
    with pytest.raises(outbound.Refused):
        outbound.Guard().resolve(url)  # resolving a literal connects nowhere
    with pytest.raises(InvalidRequestError):
        check_notify_url(url, allow_private=False)


def test_a_callback_url_that_urllib3_reads_as_another_host_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding 3: the loopback exception of the https rule is decided by ``urlsplit``,
    which reads the host after a backslash-@; urllib3 and WHATWG parsers read the host
    before it, so the upstream would call back in plain http to example.com."""
    url = "http://example.com\\@localhost/v1/callbacks/kie"
    assert urllib3.util.parse_url(url).host == "example.com"
    monkeypatch.setenv("KIE_WEBHOOK_HMAC_KEY", "whk-attack-finding-3")
    monkeypatch.setenv("KIE_CALLBACK_URL", url)

    with pytest.raises(ConfigurationError):
        load_settings()
