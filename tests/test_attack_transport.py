"""The upstream clients' transport under attack: proxies from the environment (without a
scheme, with a login, refusing), a CA bundle directory, charsets that are no text
encoding, gzip bombs, connections left by half-read answers, a proxy that answers its
CONNECT slowly, a refused certificate (not ambiguous), and the redactor's pre-check."""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import random
import socket
import ssl
import struct
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from tests.helpers import TASK_RECORD as RECORD
from tests.helpers import raw_http_server, read_request, task_record_server
from worker.upstreams.errors import NetworkError, UpstreamError
from worker.upstreams.kie import KieClient

KEY = SecretStr("sk-attack-test-0123456789")


def _client(url: str, deadline: float = 3.0) -> KieClient:
    return KieClient(url, KEY, connect_timeout=1, read_timeout=5, request_deadline=deadline)


@pytest.fixture
def proxy() -> Iterator[tuple[int, list[tuple[str, dict[str, str]]]]]:
    with task_record_server() as (url, seen):
        yield int(url.rsplit(":", 1)[1]), seen


@contextlib.contextmanager
def _tls_server(cert: str, key: str) -> Iterator[str]:
    """A task record server over TLS with ``cert``; yields its URL."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with task_record_server(lambda sock: context.wrap_socket(sock, server_side=True)) as found:
        yield found[0]


def _no_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def test_a_proxy_without_scheme_from_the_environment_is_still_used(
    proxy: tuple[int, list[tuple[str, dict[str, str]]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``HTTP_PROXY=host:port`` (no scheme) is common; requests reads it as http://host:port."""
    port, seen = proxy
    _no_no_proxy(monkeypatch)
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"127.0.0.1:{port}")
    assert _client("http://upstream.example").record_info("t1").state == "generating"
    assert [path for path, _ in seen] == [
        "http://upstream.example/api/v1/jobs/recordInfo?taskId=t1"
    ]


def test_a_proxy_that_refuses_the_connection_is_not_ambiguous(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_no_proxy(monkeypatch)
    monkeypatch.delenv("http_proxy", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens
    monkeypatch.setenv("HTTP_PROXY", f"http://user:proxy-pass-secret@127.0.0.1:{port}")
    with pytest.raises(NetworkError) as info:
        _client("http://upstream.example").record_info("t1")
    assert info.value.ambiguous is False
    assert "proxy-pass-secret" not in str(info.value)


def test_a_text_transform_charset_is_a_typed_error() -> None:
    body = json.dumps(RECORD).encode()
    answer_headers = (
        "Content-Type: application/json; charset=rot13",
        f"Content-Length: {len(body)}",
    )

    def write(conn: socket.socket) -> None:
        head = "HTTP/1.1 200 OK\r\n" + "".join(h + "\r\n" for h in answer_headers) + "\r\n"
        conn.sendall(head.encode() + body)

    with raw_http_server(write) as url:  # read as UTF-8: rot13 is a codec, not a charset
        assert _client(url).record_info("t1").state == "generating"


@pytest.mark.parametrize("layers", [1, 2])
def test_a_gzip_bomb_is_not_inflated_in_memory(layers: int) -> None:
    body = gzip.compress(b"\0" * (256 * 1024 * 1024), compresslevel=9)
    for _ in range(layers - 1):
        body = gzip.compress(body, compresslevel=9)
    enc = ", ".join(["gzip"] * layers)

    def write(conn: socket.socket) -> None:
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Encoding: {enc}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        conn.sendall(head.encode() + body)

    with raw_http_server(write) as url:
        tracemalloc.start()
        try:
            with pytest.raises(UpstreamError):
                _client(url, deadline=20).record_info("t1")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, f"peak {peak / 1e6:.0f} MB"


def test_a_reset_after_the_request_was_sent_is_ambiguous() -> None:

    def write(conn: socket.socket) -> None:  # the request was read: reset instead of answering
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    with raw_http_server(write) as url, pytest.raises(NetworkError) as info:
        _client(url).record_info("t1")
    assert info.value.ambiguous is True


def test_a_proxy_login_from_the_environment_reaches_the_proxy(
    proxy: tuple[int, list[tuple[str, dict[str, str]]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, seen = proxy
    _no_no_proxy(monkeypatch)
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://us%40er:p%3Ass@127.0.0.1:{port}")
    assert _client("http://upstream.example").record_info("t1").state == "generating"
    headers = {name.lower(): value for name, value in seen[0][1].items()}
    assert headers["proxy-authorization"] == "Basic " + base64.b64encode(b"us@er:p:ss").decode()


def _tls_files(d: Path) -> tuple[str, str, str]:
    """A CA, a server certificate for 127.0.0.1 it signed, and a hashed directory of the CA."""

    def run(*command: str) -> None:
        subprocess.run(command, check=True, capture_output=True, cwd=d)

    run(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=attack-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    )
    run(
        "openssl",
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "openssl",
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )
    cadir = d / "cadir"
    cadir.mkdir()
    (cadir / "ca.pem").write_bytes((d / "ca.pem").read_bytes())
    run("openssl", "rehash", str(cadir))
    return str(d / "srv.pem"), str(d / "srv.key"), str(cadir)


def test_a_ca_bundle_directory_from_the_environment_is_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A REQUESTS_CA_BUNDLE naming a directory (hashed with ``openssl rehash``) is read as
    one, as requests reads it."""
    cert, key, cadir = _tls_files(tmp_path)
    _no_no_proxy(monkeypatch)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", cadir)
    with _tls_server(cert, key) as url:
        assert _client(url).record_info("t1").state == "generating"


@pytest.mark.parametrize("first", ["redirect", "declared_oversized", "read_oversized"])
def test_a_half_read_answer_does_not_leave_its_connection_for_the_next_request(first: str) -> None:
    from worker.upstreams.kie import MAX_ANSWER_BYTES

    connections: list[int] = []
    requests_seen = [0]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    stopping = threading.Event()
    planted = json.dumps(
        {
            "code": 200,
            "data": {
                "taskId": "PLANTED",
                "state": "success",
                "resultJson": json.dumps({"resultUrls": ["http://x/p"]}),
            },
        }
    ).encode()
    good = json.dumps(RECORD).encode()

    def handle(conn: socket.socket, n: int) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(5)
            while True:
                if not read_request(conn):
                    return
                requests_seen[0] += 1
                if requests_seen[0] == 1:
                    fake = (
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(planted)
                    ) + planted
                    if first == "redirect":
                        conn.sendall(
                            b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:9/\r\n"
                            b"Content-Length: %d\r\n\r\n" % (len(fake) + 10) + fake
                        )
                    elif first == "declared_oversized":
                        conn.sendall(
                            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                            % (MAX_ANSWER_BYTES + 1)
                            + fake
                        )
                    else:
                        n_body = MAX_ANSWER_BYTES + 200_000
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n_body)
                        conn.sendall(b" " * (MAX_ANSWER_BYTES + 100_000))
                else:
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(good) + good
                    )

    def serve() -> None:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            connections.append(1)
            threading.Thread(target=handle, args=(conn, len(connections)), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        client = _client(f"http://127.0.0.1:{listener.getsockname()[1]}")
        with pytest.raises(UpstreamError):
            client.record_info("t1")
        info = client.record_info("t1")
        assert info.task_id == "t1"
        assert len(connections) == 2
    finally:
        stopping.set()
        listener.close()


def test_the_fragment_precheck_misses_no_fragment() -> None:

    from worker.redaction import Redactor

    rng = random.Random(7)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEF0123456789-_\"\\'é\n "
    for _ in range(3000):
        secret = "".join(rng.choice(alphabet) for _ in range(rng.randint(8, 40)))
        r = Redactor([secret, None, ""])
        i = rng.randint(0, len(secret) - 8)
        j = rng.randint(i + 8, len(secret))
        frag = secret[i:j]
        if frag == secret:
            continue
        text = (
            "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 13)))
            + frag
            + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 13)))
        )
        out = r.redact(text)
        assert frag not in out, (secret, text, out)


@pytest.mark.parametrize("target", ["http://upstream.example", "https://upstream.example"])
def test_a_slow_drip_proxy_is_cut_at_the_deadline(
    target: str, monkeypatch: pytest.MonkeyPatch
) -> None:

    def write2(conn: socket.socket) -> None:  # a proxy whose answer head never ends
        head = b"HTTP/1.1 200 OK\r\n"
        conn.sendall(head)
        for _ in range(100):
            conn.sendall(b"X-Drip: 1\r\n")
            time.sleep(0.2)

    with raw_http_server(write2, concurrent=True) as url:
        _no_no_proxy(monkeypatch)
        for name in ("http_proxy", "https_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", url)
        monkeypatch.setenv("HTTPS_PROXY", url)
        started = time.monotonic()
        with pytest.raises(UpstreamError):
            _client(target, deadline=1.0).record_info("t1")
        assert time.monotonic() - started < 3.0


def test_a_certificate_the_client_refuses_is_not_ambiguous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TLS handshake failed: no byte of the request left the client."""
    cert, key, _ = _tls_files(tmp_path)
    _no_no_proxy(monkeypatch)
    for name in ("CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    with _tls_server(cert, key) as url, pytest.raises(NetworkError) as info:
        _client(url).record_info("t1")
    assert info.value.ambiguous is False
