"""The upstream client against answers no well-behaved server gives, over real HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from tests.helpers import raw_http_server, task_record_server
from worker.fields import BlobRef
from worker.upstreams.errors import (
    BadAnswerError,
    Family,
    NetworkError,
    RateLimitedError,
    ServerError,
    UnauthorizedError,
    UpstreamError,
)
from worker.upstreams.kie import MAX_ANSWER_BYTES, KieClient, error_from_response, parse_task_info
from worker.upstreams.kie_upload import KieUploadClient
from worker.upstreams.relay import IdeogramClient

KEY = SecretStr("sk-client-test-0123456789")
RECORD = {"code": 200, "msg": "success", "data": {"taskId": "t1", "state": "generating"}}


def _client(url: str, deadline: float = 2.0) -> KieClient:
    return KieClient(url, KEY, connect_timeout=1, read_timeout=5, request_deadline=deadline)


def _answer(body: bytes, *headers: str, trickle_s: float = 0.0):  # type: ignore[no-untyped-def]
    def write(conn: socket.socket) -> None:
        head = "HTTP/1.1 200 OK\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
        conn.sendall(head.encode())
        if not trickle_s:
            conn.sendall(body)
            return
        for byte in body:
            conn.sendall(bytes([byte]))
            time.sleep(trickle_s)

    return write


def test_an_unknown_charset_is_read_as_utf8() -> None:
    body = json.dumps(RECORD).encode()
    answer = _answer(
        body, "Content-Type: application/json; charset=x-bogus", f"Content-Length: {len(body)}"
    )
    with raw_http_server(answer) as url:
        assert _client(url).record_info("t1").state == "generating"


def test_json_nested_too_deeply_is_a_bad_answer() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    error, data = error_from_response(200, deep, {})
    assert isinstance(error, BadAnswerError) and data is None
    with pytest.raises(BadAnswerError):
        parse_task_info({"taskId": "t", "state": "success", "resultJson": deep})


@pytest.mark.parametrize(
    "closing", ["Connection: close", None], ids=["connection-close", "http-1.0-style"]
)
def test_a_slow_answer_delimited_by_closing_still_ends_at_the_deadline(
    closing: str | None,
) -> None:
    body = json.dumps(RECORD).encode()  # about 80 bytes at 0.05 s each: 4 s
    headers = ["Content-Type: application/json"] + ([closing] if closing else [])
    with raw_http_server(_answer(body, *headers, trickle_s=0.05)) as url:
        started = time.monotonic()
        with pytest.raises(NetworkError) as caught:
            _client(url, deadline=1.0).record_info("t1")
        elapsed = time.monotonic() - started
    assert elapsed < 1.0 + 0.5
    assert caught.value.ambiguous


# ------------------------------------------------------------------ answer size cap

#: What a misbehaving upstream streams: far more than the cap.
FLOOD_BYTES = 50 * 1024 * 1024
FLOOD_CHUNK = 64 * 1024
#: The cap, plus what the two sockets' buffers may hold when the client stops reading.
SENT_BOUND = MAX_ANSWER_BYTES + 12 * 1024 * 1024
#: Most memory the client may allocate while refusing the flood.
MEMORY_BOUND = 8 * 1024 * 1024


class Flood:
    """An answer of :data:`FLOOD_BYTES` of JSON; counts the bytes the client took."""

    def __init__(self, framing: str, status: int = 200) -> None:
        self.framing = framing
        self.status = status
        self.sent = 0
        self.done = threading.Event()

    def __call__(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, FLOOD_CHUNK)
        head = [f"HTTP/1.1 {self.status} Whatever", "Content-Type: application/json"]
        head += {
            "content-length": [f"Content-Length: {FLOOD_BYTES}"],
            "chunked": ["Transfer-Encoding: chunked"],
            "close": ["Connection: close"],
        }[self.framing]
        try:
            conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            start = b'{"code": 200, "data": "'
            chunk = start + b"x" * (FLOOD_CHUNK - len(start))
            while self.sent < FLOOD_BYTES:
                framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
                conn.sendall(framed if self.framing == "chunked" else chunk)
                self.sent += len(chunk)
        finally:
            self.done.set()


@pytest.mark.parametrize("framing", ["content-length", "chunked", "close"])
def test_an_answer_over_the_cap_is_a_retry_error_read_no_further_than_the_cap(
    framing: str,
) -> None:
    flood = Flood(framing)
    with raw_http_server(flood) as url:
        tracemalloc.start()
        try:
            with pytest.raises(BadAnswerError) as caught:
                _client(url, deadline=10.0).create_task({"prompt": "p"})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert flood.done.wait(10)

    assert flood.sent < SENT_BOUND, f"the client took {flood.sent} bytes"
    assert peak < MEMORY_BOUND, f"the client allocated {peak} bytes"
    assert caught.value.family is Family.RETRY
    # An unreadable createTask answer: the task may exist, so its outcome is unknown.
    assert caught.value.ambiguous and str(MAX_ANSWER_BYTES) in str(caught.value)


@pytest.mark.parametrize(
    ("status", "expected"), [(429, RateLimitedError), (502, ServerError), (401, UnauthorizedError)]
)
def test_an_error_answer_over_the_cap_keeps_the_meaning_of_its_status(
    status: int, expected: type[UpstreamError]
) -> None:
    flood = Flood("close", status)
    with raw_http_server(flood) as url, pytest.raises(expected):
        _client(url).record_info("t1")


def _relay_status(url: str) -> object:
    return IdeogramClient(url, KEY, status_deadline=10.0).record_info("t1")


def _relay_remix(url: str) -> object:
    ref = BlobRef(blob="k", name="a.png", content_type="image/png", size=5, sha256="0" * 64)
    return IdeogramClient(url, KEY, request_deadline=10.0).remix({"prompt": "p"}, b"image", ref)


def _upload(url: str) -> object:
    return KieUploadClient(url, KEY, request_deadline=10.0).upload(b"image", "a.png", "image/png")


@pytest.mark.parametrize("call", [_relay_status, _relay_remix, _upload])
def test_the_relay_and_upload_clients_cap_their_answers_too(
    call: Callable[[str], object],
) -> None:
    flood = Flood("chunked")
    with raw_http_server(flood) as url:
        with pytest.raises(BadAnswerError) as caught:
            call(url)
        assert flood.done.wait(10)
    assert flood.sent < SENT_BOUND, f"the client took {flood.sent} bytes"
    assert caught.value.family is Family.RETRY and caught.value.ambiguous


def test_an_answer_just_under_the_cap_is_read() -> None:
    filler = "x" * (MAX_ANSWER_BYTES - 200)
    body = json.dumps({**RECORD, "data": {**RECORD["data"], "param": filler}}).encode()
    assert len(body) <= MAX_ANSWER_BYTES
    answer = _answer(body, "Content-Type: application/json", f"Content-Length: {len(body)}")
    with raw_http_server(answer) as url:
        assert _client(url).record_info("t1").param == filler


# ------------------------------------------------------------------ the environment


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[tuple[str, dict[str, str]]]]]:
    with task_record_server() as found:
        yield found


def test_a_proxy_named_by_the_environment_carries_the_upstream_requests(
    recorder: tuple[str, list[tuple[str, dict[str, str]]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy, seen = recorder
    monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = _client("http://upstream.example")
    for _ in range(2):  # the second request reads the environment from the first's
        assert client.record_info("t1").state == "generating"
    assert [path for path, _ in seen] == [
        "http://upstream.example/api/v1/jobs/recordInfo?taskId=t1"
    ] * 2
    assert seen[0][1]["Authorization"] == f"Bearer {KEY.get_secret_value()}"


def test_no_proxy_from_the_environment_still_exempts_a_host(
    recorder: tuple[str, list[tuple[str, dict[str, str]]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, seen = recorder
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert _client(url).record_info("t1").state == "generating"
    assert [path for path, _ in seen] == ["/api/v1/jobs/recordInfo?taskId=t1"]


def test_a_netrc_login_never_replaces_the_bearer_token(
    recorder: tuple[str, list[tuple[str, dict[str, str]]]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    url, seen = recorder
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password other-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert _client(url).record_info("t1").state == "generating"
    assert seen[0][1]["Authorization"] == f"Bearer {KEY.get_secret_value()}"
