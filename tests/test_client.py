"""The upstream client against answers no well-behaved server gives, over real HTTP."""

from __future__ import annotations

import json
import socket
import time

import pytest
from pydantic import SecretStr

from tests.helpers import raw_http_server
from worker.upstreams.errors import BadAnswerError, NetworkError
from worker.upstreams.kie import KieClient, error_from_response, parse_task_info

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
