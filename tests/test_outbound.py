"""The outbound guard (worker.net.outbound) against crafted URLs, names and servers on 127.0.0.1.

Names resolve through the fake network of :mod:`tests.outbound_kit` (no DNS here), which
also sees every connection tried: a refusal must come before any, and the one connection
a fetch makes must go to the address that was checked.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import raw_http_server
from tests.outbound_kit import PUBLIC, Network, network, recorder, redirect_to, self_signed
from tests.webhook_receiver import free_port
from worker.net import outbound
from worker.net.outbound import (
    MAX_URL_CHARS,
    REFUSED,
    REFUSED_NETWORKS,
    BadURL,
    Guard,
    Refused,
    TooLarge,
    Unresolved,
    check_url,
    is_public,
    read_capped,
)

__all__ = ["network"]  # the fixture, used by name

#: URLs whose host is, or stands for, an address no fetch may reach.
CRAFTED = [
    # IPv4 shorthand, as resolvers read it (inet_aton)
    "http://127.1/hook",
    "http://2130706433/hook",
    "http://0/hook",
    "http://0x7f.1/hook",
    # IPv6 forms that carry a private IPv4 address
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
    "http://[::ffff:0:a9fe:a9fe]/latest/meta-data/",
    "http://[2002:a9fe:a9fe::1]/latest/meta-data/",
    "http://[::169.254.169.254]/latest/meta-data/",
    "http://[64:ff9b::7f00:1]/",
    "http://[::ffff:127.0.0.1]/",
    # the usual targets
    "http://169.254.169.254/latest/meta-data/",
    "http://127.0.0.1:6379/",
    "http://[::1]:8000/metrics",
    "http://10.0.0.5/",
    "https://192.168.1.1/",
    "http://172.16.0.1/",
    "http://localhost:8080/x",
    "http://LOCALHOST./x",
    "http://admin.localhost/",
    # what Python's is_global lets through, or other ranges no server of the internet has
    "http://[fec0::1]/",
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://[fe80::1]/",
    "http://[ff02::1]/",
    "http://[2001:db8::1]/",
    "http://[::]/",
    "http://100.64.0.1/",
    "http://198.18.0.1/",
    "http://192.0.2.1/",
    "http://198.51.100.7/",
    "http://203.0.113.9/",
    "http://192.0.0.8/",
    "http://224.0.0.1/",
    "http://255.255.255.255/",
    "http://0.0.0.0/",
    "http://240.0.0.1/",
]


def guard(net: Network, *, allow_private: bool = False) -> Guard:
    return Guard(allow_private=allow_private, resolver=net.resolver)


@pytest.mark.parametrize("url", CRAFTED)
def test_a_crafted_url_is_refused_before_any_lookup_or_connection(
    network: Network, url: str
) -> None:
    with pytest.raises(Refused) as caught:
        outbound.session(guard(network)).get(url, timeout=2)
    assert str(caught.value) == REFUSED == "refused: not a public address"
    assert network.connects == [] and network.lookups == []


@pytest.mark.parametrize("url", CRAFTED)
def test_a_crafted_url_is_refused_as_written(url: str) -> None:
    with pytest.raises(Refused):
        check_url(url, allow_private=False)
    check_url(url, allow_private=True)


@pytest.mark.parametrize(
    "url",
    [
        "http://①②⑦.0.0.1/",
        "http://127。0。0。1/",
        "http://ⓛⓞⓒⓐⓛⓗⓞⓢⓣ/",
        "http://\uff2c\uff2f\uff23\uff21\uff2c\uff28\uff2f\uff33\uff34/",  # fullwidth
    ],
)
def test_a_host_in_another_unicode_form_is_refused_as_written(url: str) -> None:
    """Such a name is read as its ASCII form (requests refuses to fetch it anyway)."""
    with pytest.raises(Refused):
        check_url(url, allow_private=False)


@pytest.mark.parametrize(
    "addresses",
    [
        ["127.0.0.1"],
        ["10.0.0.5"],
        ["fec0::1"],
        ["::ffff:10.0.0.1"],
        ["100.64.1.2"],
        [PUBLIC, "169.254.169.254"],  # one private address among public ones is enough
    ],
)
def test_a_name_with_any_address_not_public_is_refused_before_any_connection(
    network: Network, addresses: list[str]
) -> None:
    network.answer("cdn.example", addresses)
    with pytest.raises(Refused) as caught:
        outbound.session(guard(network)).get("https://cdn.example/a.png", timeout=2)
    assert str(caught.value) == REFUSED
    assert network.lookups == ["cdn.example"] and network.connects == []


def test_an_open_and_a_closed_internal_port_give_the_same_refusal(network: Network) -> None:
    """No connection is tried, so nothing tells an open port from a closed one."""
    network.answer("inside.example", ["127.0.0.1"])
    errors = []
    with recorder() as internal:
        for port in (internal.port, free_port()):
            with pytest.raises(Refused) as caught:
                outbound.session(guard(network)).get(f"http://inside.example:{port}/", timeout=2)
            errors.append(str(caught.value))
    assert errors == [REFUSED, REFUSED]
    assert internal.connections == 0 and network.connects == []


def test_the_socket_goes_to_the_address_that_was_checked(network: Network) -> None:
    """DNS rebinding: the name answers a public address, then a loopback one. The guard
    resolves once and connects to what it checked; the Host header keeps the name."""
    with recorder() as standin, recorder() as internal:
        network.route(PUBLIC, standin.port)
        network.answer("rebind.example", [PUBLIC], ["127.0.0.1"])
        url = f"http://rebind.example:{internal.port}/x"
        response = outbound.session(guard(network)).get(url, timeout=5)
    assert response.status_code == 200
    assert network.lookups == ["rebind.example"]
    assert network.connects == [PUBLIC]
    assert internal.connections == 0
    assert [seen.headers["host"] for seen in standin.requests] == [
        f"rebind.example:{internal.port}"
    ]


def test_tls_checks_the_certificate_against_the_name_not_the_address(
    network: Network, tmp_path: Path
) -> None:
    """The socket goes to 127.0.0.1, but SNI and the certificate check use the name."""
    names: list[str | None] = []

    def server_name(_sock: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        names.append(name)

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(self_signed(tmp_path, "cdn.example"))
    tls.sni_callback = server_name
    network.answer("cdn.example", ["127.0.0.1"])
    network.answer("other.example", ["127.0.0.1"])
    session = outbound.session(guard(network, allow_private=True))
    with recorder(tls=tls) as server:
        trusted = str(tmp_path / "cdn.example.pem")
        response = session.get(f"https://cdn.example:{server.port}/a.png", verify=trusted)
        with pytest.raises(requests.exceptions.SSLError):
            session.get(f"https://other.example:{server.port}/a.png", verify=trusted)
    assert response.status_code == 200
    assert names == ["cdn.example", "other.example"]
    assert network.connects == ["127.0.0.1", "127.0.0.1"]


def test_the_next_checked_address_is_tried_when_the_first_does_not_answer(
    network: Network,
) -> None:
    other = "93.184.215.15"
    with recorder() as standin:
        network.route(other, standin.port)
        network.answer("two.example", [PUBLIC, other])  # PUBLIC is not routed: refused
        response = outbound.session(guard(network)).get("http://two.example/", timeout=5)
    assert response.status_code == 200
    assert network.connects == [PUBLIC, other]


def test_every_redirect_hop_is_checked_again(network: Network) -> None:
    with recorder() as internal, recorder() as standin:
        standin.replies["/a.png"] = redirect_to(f"http://127.0.0.1:{internal.port}/")
        standin.replies["/b.png"] = redirect_to("http://169.254.169.254/latest/meta-data/")
        network.route(PUBLIC, standin.port)
        network.answer("cdn.example", [PUBLIC])
        session = outbound.session(guard(network))
        for path in ("/a.png", "/b.png"):
            with pytest.raises(Refused):
                session.get(f"http://cdn.example{path}", timeout=5, allow_redirects=True)
    assert internal.connections == 0
    assert network.connects == [PUBLIC, PUBLIC]


def test_private_addresses_are_reached_only_when_allowed(network: Network) -> None:
    with recorder() as local:
        with pytest.raises(Refused):
            outbound.session(guard(network)).get(local.url("/x"), timeout=5)
        response = outbound.session(guard(network, allow_private=True)).get(local.url("/x"))
    assert response.status_code == 200
    assert local.connections == 1
    assert local.requests[0].headers["host"] == f"127.0.0.1:{local.port}"


def test_proxy_variables_and_netrc_are_ignored(
    network: Network, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password netrc-secret\n")
    with recorder() as proxy, recorder() as target:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
            monkeypatch.setenv(name, proxy.url())
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.setenv("NETRC", str(netrc))
        response = outbound.session(guard(network, allow_private=True)).get(target.url("/a"))
    assert response.status_code == 200
    assert proxy.connections == 0
    assert [seen.path for seen in target.requests] == ["/a"]
    assert "authorization" not in target.requests[0].headers


def test_a_caller_given_proxy_is_not_used(network: Network) -> None:
    with recorder() as proxy, recorder() as target:
        session = outbound.session(guard(network, allow_private=True))
        response = session.get(target.url("/a"), proxies={"http": proxy.url()}, timeout=5)
    assert response.status_code == 200 and proxy.connections == 0
    assert [seen.path for seen in target.requests] == ["/a"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://cdn.example/a.png", "not an http(s) URL"),
        ("file:///etc/passwd", "not an http(s) URL"),
        ("http:///no-host", "not an http(s) URL"),
        ("http://cdn.example:99999/", "not an http(s) URL"),
        ("http://user:secret@cdn.example/", "a URL with a user name or password"),
        ("http://@cdn.example/", "a URL with a user name or password"),
        ("http://cdn.example/\x7f", "a URL with a control character"),
        (
            "http://cdn.example/" + "a" * MAX_URL_CHARS,
            f"a URL of more than {MAX_URL_CHARS} characters",
        ),
    ],
)
def test_a_url_that_cannot_be_fetched_is_one_line(network: Network, url: str, message: str) -> None:
    with pytest.raises(BadURL) as caught:
        check_url(url, allow_private=True)
    assert str(caught.value) == message
    assert network.lookups == []


def test_a_long_signed_url_is_fetched() -> None:
    query = "X-Amz-Security-Token=" + "t" * 3000
    with recorder() as server:
        response = outbound.session(Guard(allow_private=True)).get(server.url(f"/0.png?{query}"))
    assert response.status_code == 200 and server.requests[0].path == f"/0.png?{query}"


def test_a_name_that_does_not_resolve_is_one_line(network: Network) -> None:
    with pytest.raises(Unresolved) as caught:
        outbound.session(guard(network)).get("http://nowhere.example/", timeout=2)
    assert str(caught.value) == "cannot resolve the host (Name or service not known)"
    assert network.connects == []


@pytest.mark.parametrize(
    "address",
    [PUBLIC, "8.8.8.8", "2606:4700::1111", "64:ff9b::808:808", "::ffff:8.8.8.8", "2002:808:808::1"],
)
def test_public_addresses_are_public(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


def test_every_refused_network_is_refused_from_its_first_to_its_last_address() -> None:
    for network_ in REFUSED_NETWORKS:
        assert not is_public(network_[0]), network_
        assert not is_public(network_[-1]), network_


def test_reading_stops_at_the_cap() -> None:
    def endless(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        ends = time.monotonic() + 5
        while time.monotonic() < ends:
            conn.sendall(b"\x00" * 65536)

    started = time.monotonic()
    with raw_http_server(endless) as base:
        response = outbound.session(Guard(allow_private=True)).get(base, stream=True, timeout=5)
        with response, pytest.raises(TooLarge) as caught:
            read_capped(response, 100_000)
    assert str(caught.value) == "more than the 100000 bytes allowed"
    assert time.monotonic() - started < 3


def test_a_declared_length_past_the_cap_is_refused_before_reading() -> None:
    with recorder({"/big": (200, {}, b"x" * 5000)}) as server:
        response = outbound.session(Guard(allow_private=True)).get(server.url("/big"), stream=True)
        with response, pytest.raises(TooLarge) as caught:
            read_capped(response, 100)
        small = outbound.session(Guard(allow_private=True)).get(server.url("/big"), stream=True)
        with small:
            assert read_capped(small, 5000) == b"x" * 5000
    assert str(caught.value) == "5000 bytes is more than the 100 bytes allowed"


def test_a_refusal_is_not_a_requests_error() -> None:
    """Callers tell a refusal (never tried again) from a failed request by its type."""
    assert not issubclass(Refused, requests.RequestException)
    assert issubclass(Refused, outbound.OutboundError)
