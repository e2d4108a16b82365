"""The sandbox over real HTTP: kie.ai shapes, validation, fault injection, callbacks, control."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import logging
import queue
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from PIL import Image

from sandbox import SandboxConfig, SandboxControl, SandboxServer
from sandbox.cli import sandbox_command
from sandbox.launch import ManagedProcess, ensure_redis, free_port, redis_ping, start_sandbox
from sandbox.state import Task

API_KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CREATE = "/api/v1/jobs/createTask"
RECORD = "/api/v1/jobs/recordInfo"
CREDIT = "/api/v1/chat/credit"
FAST_SECONDS = 0.3
STATE_ORDER = ["waiting", "queuing", "generating", "success"]
WAIT_S = 5.0


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.trust_env = False
        yield session


@pytest.fixture
def server() -> Iterator[SandboxServer]:
    config = SandboxConfig(api_key=API_KEY, generation_seconds=FAST_SECONDS, seed=7)
    with SandboxServer(config) as running:
        yield running


def unique_prompt(text: str = "a knight in the rain") -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def create_body(prompt: str | None = None, **input_fields: Any) -> dict[str, Any]:
    task_input = {
        "prompt": prompt or unique_prompt(),
        "image_url": "https://files.example/base.png",
        "reference_image_urls": ["https://files.example/ref.png"],
        **input_fields,
    }
    return {"model": "ideogram/character-remix", "input": task_input}


def create(
    http: requests.Session, server: SandboxServer, body: Any = None, key: str = API_KEY
) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return http.post(server.url + CREATE, json=body or create_body(), headers=headers, timeout=5)


def record(http: requests.Session, server: SandboxServer, task_id: str) -> requests.Response:
    return http.get(server.url + RECORD, params={"taskId": task_id}, headers=AUTH, timeout=5)


def wait_final(http: requests.Session, server: SandboxServer, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        data: dict[str, Any] = record(http, server, task_id).json()["data"]
        if data["state"] in ("success", "fail"):
            return data
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} did not finish")


def test_happy_path_walks_states_to_success_and_serves_pngs(http: requests.Session) -> None:
    config = SandboxConfig(api_key=API_KEY, generation_seconds=1.0)
    with SandboxServer(config) as server:
        body = create_body(num_images="2", image_size="landscape_16_9")
        answer = create(http, server, body)
        assert answer.status_code == 200
        assert answer.json()["code"] == 200
        task_id = answer.json()["data"]["taskId"]
        assert task_id.startswith("task_ideogram_")

        states: list[str] = []
        while not states or states[-1] != "success":
            data = record(http, server, task_id).json()["data"]
            if not states or states[-1] != data["state"]:
                states.append(data["state"])
            time.sleep(0.02)

        assert "generating" in states
        assert states == [state for state in STATE_ORDER if state in states]
        assert json.loads(data["param"]) == body
        assert data["failCode"] == "" and data["costTime"] == 1000
        urls = json.loads(data["resultJson"])["resultUrls"]
        assert len(urls) == 2
        image_answer = http.get(urls[1], timeout=5)
        assert image_answer.headers["Content-Type"] == "image/png"
        image = Image.open(io.BytesIO(image_answer.content))
        image.verify()
        assert image.format == "PNG" and image.size == (512, 288)


def test_state_follows_the_fraction_of_generation_time() -> None:
    task = Task("t", "m", "{}", "p", 1, "square", None, 100.0, 10.0, fails=False)
    assert [task.state_at(100.0 + s)[0] for s in (0, 0.9, 1, 2.9, 3, 9.9, 10)] == [
        "waiting",
        "waiting",
        "queuing",
        "queuing",
        "generating",
        "generating",
        "success",
    ]
    assert task.state_at(105.0)[1] == 103.0
    assert task.record(100.5, "http://x")["completeTime"] is None


def test_file_is_not_served_before_the_task_finishes(
    http: requests.Session, server: SandboxServer
) -> None:
    task_id = create(http, server).json()["data"]["taskId"]
    assert http.get(f"{server.url}/files/{task_id}/0.png", timeout=5).status_code == 404
    wait_final(http, server, task_id)
    assert http.get(f"{server.url}/files/{task_id}/0.png", timeout=5).status_code == 200
    assert http.get(f"{server.url}/files/{task_id}/1.png", timeout=5).status_code == 404


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {API_KEY}", API_KEY])
def test_missing_or_wrong_key_is_401(
    http: requests.Session, server: SandboxServer, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    answer = http.post(server.url + CREATE, json=create_body(), headers=headers, timeout=5)
    assert answer.status_code == 401
    assert answer.json()["code"] == 401
    stats = server.stats()
    assert stats["tasks"] == 0
    assert stats["auth_headers_seen_invalid"] == 1


INVALID_INPUTS: list[tuple[str, dict[str, Any]]] = [
    ("prompt", {"prompt": ""}),
    ("prompt", {"prompt": "x" * 5001}),
    ("prompt", {"prompt": 42}),
    ("image_url", {"image_url": "not a url"}),
    ("image_url", {"image_url": "ftp://files.example/a.png"}),
    ("reference_image_urls", {"reference_image_urls": []}),
    ("reference_image_urls", {"reference_image_urls": "https://files.example/a.png"}),
    ("rendering_speed", {"rendering_speed": "FAST"}),
    ("style", {"style": "ANIME"}),
    ("expand_prompt", {"expand_prompt": "yes"}),
    ("image_size", {"image_size": "huge"}),
    ("num_images", {"num_images": 2}),
    ("num_images", {"num_images": "5"}),
    ("seed", {"seed": "1"}),
    ("seed", {"seed": 1.5}),
    ("strength", {"strength": 0.15}),
    ("strength", {"strength": 1.1}),
    ("strength", {"strength": 0}),
    ("strength", {"strength": True}),
    ("negative_prompt", {"negative_prompt": "x" * 501}),
    ("image_urls", {"image_urls": ["nope"]}),
    ("reference_mask_urls", {"reference_mask_urls": []}),
]


@pytest.mark.parametrize(("field", "overrides"), INVALID_INPUTS)
def test_invalid_input_field_is_422_naming_it(
    http: requests.Session, server: SandboxServer, field: str, overrides: dict[str, Any]
) -> None:
    body = create_body()
    body["input"].update(overrides)
    answer = create(http, server, body)
    assert answer.status_code == 422
    assert answer.json()["code"] == 422
    assert f"input.{field}" in answer.json()["msg"]
    assert server.stats()["tasks"] == 0


@pytest.mark.parametrize(
    ("field", "body"),
    [
        ("model", {**create_body(), "model": "ideogram/v3"}),
        ("callBackUrl", {**create_body(), "callBackUrl": "not-a-url"}),
        ("input", {"model": "ideogram/character-remix"}),
        ("input.image_url", {"model": "ideogram/character-remix", "input": {"prompt": "p"}}),
        ("JSON object", ["not", "an", "object"]),
    ],
)
def test_invalid_body_is_422_naming_the_field(
    http: requests.Session, server: SandboxServer, field: str, body: Any
) -> None:
    answer = create(http, server, body)
    assert answer.status_code == 422
    assert field in answer.json()["msg"]


def test_body_that_is_not_json_is_422(http: requests.Session, server: SandboxServer) -> None:
    answer = http.post(server.url + CREATE, data=b"{nope", headers=AUTH, timeout=5)
    assert answer.status_code == 422
    assert answer.json()["code"] == 422


def test_every_optional_field_is_accepted(http: requests.Session, server: SandboxServer) -> None:
    body = create_body(
        rendering_speed="QUALITY",
        style="FICTION",
        expand_prompt=False,
        image_size="portrait_4_3",
        num_images="4",
        seed=1234,
        strength=0.3,
        negative_prompt="blur",
        image_urls=["https://files.example/style.png"],
        reference_mask_urls="",
    )
    body["callBackUrl"] = "http://127.0.0.1:9/callback"
    assert create(http, server, body).json()["code"] == 200


@pytest.mark.parametrize(("style", "status"), [("http", 429), ("body", 200)])
def test_injected_429_in_both_styles(
    http: requests.Session, server: SandboxServer, style: str, status: int
) -> None:
    server.configure(faults={429: 1.0}, fault_style=style)
    answer = create(http, server)
    assert answer.status_code == status
    assert answer.json()["code"] == 429
    assert "Retry-After" not in answer.headers
    assert server.stats()["create_by_code"] == {"429": 1}
    assert server.stats()["tasks"] == 0


def test_fault_endpoints_limit_where_faults_hit(
    http: requests.Session, server: SandboxServer
) -> None:
    task_id = create(http, server).json()["data"]["taskId"]
    server.configure(faults={500: 1.0}, fault_endpoints=["createTask"])
    assert create(http, server).status_code == 500
    assert record(http, server, task_id).status_code == 200
    server.configure(fault_endpoints=["recordInfo"])
    assert record(http, server, task_id).json()["code"] == 500


def answer_style(answer: requests.Response) -> str:
    """``http``, ``body`` or ``page``: how an error answer was written."""
    if not answer.headers["Content-Type"].startswith("application/json"):
        return "page"
    return "body" if answer.status_code == 200 else "http"


def test_mixed_style_answers_in_all_three_styles(
    http: requests.Session, server: SandboxServer
) -> None:
    server.configure(faults={455: 1.0}, fault_style="mixed")
    answers = [create(http, server) for _ in range(30)]
    assert {answer_style(answer) for answer in answers} == {"http", "body", "page"}
    assert {answer.status_code for answer in answers} == {200, 455}
    assert server.stats()["create_by_code"] == {"455": 30}


PAGE_CASES: list[tuple[int, dict[str, Any], str, str]] = [
    (401, {}, "wrong", "text/plain"),
    (402, {"credits": 0}, API_KEY, "text/plain"),
    (429, {"faults": {429: 1.0}}, API_KEY, "text/html"),
    (455, {"maintenance": True}, API_KEY, "text/plain"),
    (500, {"faults": {500: 1.0}}, API_KEY, "text/html"),
]


@pytest.mark.parametrize(("code", "settings", "key", "content_type"), PAGE_CASES)
def test_page_style_errors_are_not_json(
    http: requests.Session,
    server: SandboxServer,
    code: int,
    settings: dict[str, Any],
    key: str,
    content_type: str,
) -> None:
    server.configure(fault_style="page", **settings)
    answer = create(http, server, key=key)
    assert answer.status_code == code
    assert answer.headers["Content-Type"].startswith(content_type)
    with pytest.raises(ValueError):
        answer.json()
    if content_type == "text/html":
        assert f"<title>{code} " in answer.text and "nginx" in answer.text
    else:
        assert answer.text.startswith(f"{code} ")
    assert server.stats()["create_by_code"] == {str(code): 1}
    assert server.stats()["tasks"] == 0


def test_page_style_texts_and_pages_everywhere(
    http: requests.Session, server: SandboxServer
) -> None:
    server.configure(fault_style="page", credits=0)
    assert create(http, server).text == "402 Payment Required: Insufficient credits\n"
    unauthorized = create(http, server, key="wrong").text
    assert unauthorized == "401 Unauthorized: authentication credentials are missing or invalid\n"
    missing = record(http, server, "task_ideogram_0_unknown")
    assert missing.status_code == 404
    assert missing.text == "404 Not Found: task task_ideogram_0_unknown not found\n"
    server.configure(credits=None)
    directive = create(http, server, create_body(unique_prompt("[sandbox:create=505]")))
    assert directive.status_code == 505
    assert "<title>505 Feature Disabled</title>" in directive.text
    empty_prompt = create_body()
    empty_prompt["input"]["prompt"] = ""
    invalid = create(http, server, empty_prompt)
    assert invalid.status_code == 422 and invalid.headers["Content-Type"].startswith("text/plain")
    assert invalid.text.startswith("422 Unprocessable Entity: input.prompt")
    server.configure(maintenance=True)
    credit = http.get(server.url + CREDIT, headers=AUTH, timeout=5)
    assert credit.status_code == 455
    assert credit.text == "455 Service Unavailable: the system is under maintenance\n"
    server.configure(maintenance=False, faults={500: 1.0}, fault_endpoints=["recordInfo"])
    server_error = record(http, server, "task_ideogram_0_unknown")
    assert server_error.status_code == 500
    assert server_error.headers["Content-Type"].startswith("text/html")
    assert "<title>500 Internal Server Error</title>" in server_error.text
    assert server.stats()["record_by_code"] == {"404": 1, "500": 1}


RETRY_AFTER_VALUES = ["inf", "nan", "86400", "1e308", "-5", "0", "Wed, 21 Oct 2015 07:28:00 GMT"]


@pytest.mark.parametrize("value", RETRY_AFTER_VALUES)
def test_retry_after_is_sent_verbatim_on_every_429(
    http: requests.Session, server: SandboxServer, value: str
) -> None:
    server.configure(retry_after=value, faults={429: 1.0})
    assert create(http, server).headers["Retry-After"] == value
    server.configure(faults={}, rate_limit="1/60s")
    assert create(http, server).status_code == 200
    limited = create(http, server)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == value
    server.configure(retry_after_header=False, fault_style="page")
    assert create(http, server).headers["Retry-After"] == value
    assert server.stats()["rate_limited"] == 2


def test_rate_limit_answers_429_with_retry_after_and_drops(
    http: requests.Session, server: SandboxServer
) -> None:
    server.configure(rate_limit="3/2s")
    prompts = [unique_prompt() for _ in range(4)]
    answers = [create(http, server, create_body(prompt)) for prompt in prompts]
    assert [answer.status_code for answer in answers] == [200, 200, 200, 429]
    assert 1 <= int(answers[3].headers["Retry-After"]) <= 2
    stats = server.stats()
    assert stats["tasks"] == 3 and stats["create_accepted"] == 3 and stats["rate_limited"] == 1
    assert prompts[3] not in stats["accepted_by_prompt"]
    assert stats["create_requests_by_prompt"][prompts[3]] == 1


def test_rate_limit_without_retry_after_header(
    http: requests.Session, server: SandboxServer
) -> None:
    server.configure(rate_limit="1/5s", retry_after_header=False, fault_style="body")
    assert create(http, server).status_code == 200
    limited = create(http, server)
    assert limited.status_code == 200 and limited.json()["code"] == 429
    assert "Retry-After" not in limited.headers


def test_credits_run_out_with_402(http: requests.Session, server: SandboxServer) -> None:
    server.configure(credits=1)
    assert http.get(server.url + CREDIT, headers=AUTH, timeout=5).json()["data"] == 1
    assert create(http, server).status_code == 200
    assert create(http, server).status_code == 402
    assert http.get(server.url + CREDIT, headers=AUTH, timeout=5).json()["data"] == 0
    assert server.config.credits == 0


def test_credit_endpoint_reports_unlimited_and_checks_the_key(
    http: requests.Session, server: SandboxServer
) -> None:
    answer = http.get(server.url + CREDIT, headers=AUTH, timeout=5).json()
    assert answer == {"code": 200, "msg": "success", "data": 999999}
    assert http.get(server.url + CREDIT, timeout=5).status_code == 401


def test_maintenance_answers_455_everywhere(http: requests.Session, server: SandboxServer) -> None:
    task_id = create(http, server).json()["data"]["taskId"]
    server.configure(maintenance=True)
    assert create(http, server).status_code == 455
    assert record(http, server, task_id).json()["code"] == 455
    assert http.get(server.url + CREDIT, headers=AUTH, timeout=5).status_code == 455


def test_fail_directive_ends_in_fail(http: requests.Session, server: SandboxServer) -> None:
    body = create_body(unique_prompt("[sandbox:fail] doomed"))
    data = wait_final(http, server, create(http, server, body).json()["data"]["taskId"])
    assert data["state"] == "fail"
    assert data["failCode"] == "501"
    assert data["failMsg"] == "generation failed (sandbox)"
    assert data["resultJson"] == ""


def test_create_directive_answers_that_code_and_creates_nothing(
    http: requests.Session, server: SandboxServer
) -> None:
    answer = create(http, server, create_body(unique_prompt("[sandbox:create=501]")))
    assert answer.status_code == 501 and answer.json()["code"] == 501
    bad = create(http, server, create_body(unique_prompt("[sandbox:create=200]")))
    assert bad.status_code == 422
    assert server.stats()["tasks"] == 0


def test_seconds_directive_sets_the_generation_time(
    http: requests.Session, server: SandboxServer
) -> None:
    answer = create(http, server, create_body(unique_prompt("[sandbox:seconds=0]")))
    data = record(http, server, answer.json()["data"]["taskId"]).json()["data"]
    assert data["state"] == "success" and data["costTime"] == 0


@pytest.mark.parametrize(("style", "status"), [("http", 404), ("body", 200)])
def test_unknown_task_is_404(
    http: requests.Session, server: SandboxServer, style: str, status: int
) -> None:
    server.configure(fault_style=style)
    answer = record(http, server, "task_ideogram_0_unknown")
    assert answer.status_code == status and answer.json()["code"] == 404


def test_connection_reset_raises_connection_error(
    http: requests.Session, server: SandboxServer
) -> None:
    server.configure(reset_rate=1.0)
    with pytest.raises(requests.ConnectionError):
        create(http, server)
    stats = server.stats()
    assert stats["resets"] == 1 and stats["create_requests"] == 1 and stats["tasks"] == 0


def test_html_error_page_is_502(http: requests.Session, server: SandboxServer) -> None:
    server.configure(html_rate=1.0)
    answer = create(http, server)
    assert answer.status_code == 502
    assert answer.headers["Content-Type"].startswith("text/html")
    assert "502 Bad Gateway" in answer.text


def raw_create(server: SandboxServer, body: dict[str, Any]) -> bytes:
    """Send a createTask over a bare socket; everything received until the server closes."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {CREATE} HTTP/1.1\r\nHost: {server.host}\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    received = b""
    with socket.create_connection((server.host, server.port), timeout=5) as connection:
        connection.sendall(head.encode() + payload)
        while chunk := connection.recv(4096):
            received += chunk
    return received


def test_cut_body_sends_the_full_length_then_half_and_closes(server: SandboxServer) -> None:
    server.configure(cut_rate=1.0)
    head, _, body = raw_create(server, create_body()).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(
        next(line for line in head.split(b"\r\n") if line.startswith(b"Content-Length")).split(
            b":"
        )[1]
    )
    assert 0 < len(body) == length // 2 < length
    assert body.startswith(b'{"code": 200')
    assert server.stats()["cut_bodies"] == 1


Receiver = tuple[str, "queue.Queue[tuple[dict[str, str], bytes]]"]


def delivered_task_id(receiver: Receiver) -> str:
    """The task id of the next callback the receiver gets."""
    _, deliveries = receiver
    _, payload = deliveries.get(timeout=WAIT_S)
    task_id: str = json.loads(payload)["data"]["taskId"]
    return task_id


def test_cut_create_answer_still_creates_the_task_and_is_ambiguous(
    http: requests.Session, server: SandboxServer, receiver: Receiver
) -> None:
    server.configure(cut_rate=1.0, fault_endpoints=["createTask"])
    prompt = unique_prompt("[sandbox:seconds=0] cut")
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        create(http, server, {**create_body(prompt), "callBackUrl": receiver[0]})
    data = record(http, server, delivered_task_id(receiver)).json()["data"]
    assert data["state"] == "success"
    assert json.loads(data["param"])["input"]["prompt"] == prompt
    stats = server.stats()
    assert stats["cut_bodies"] == 1 and stats["create_by_code"] == {"200": 1}
    assert stats["ambiguous"] == 1 and stats["ambiguous_by_prompt"] == {prompt: 1}
    assert stats["tasks"] == 1


def test_cut_of_an_answer_that_created_nothing_is_not_ambiguous(
    http: requests.Session, server: SandboxServer
) -> None:
    server.configure(cut_rate=1.0)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        create(http, server, key="wrong")
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        record(http, server, "task_ideogram_0_unknown")
    server.configure(fault_endpoints=["recordInfo"])
    assert create(http, server).status_code == 200
    stats = server.stats()
    assert stats["cut_bodies"] == 2 and stats["ambiguous"] == 0
    assert stats["ambiguous_by_prompt"] == {}


def test_drop_creates_charges_and_calls_back_but_resets(
    http: requests.Session, server: SandboxServer, receiver: Receiver
) -> None:
    server.configure(drop_rate=1.0, credits=3, fault_endpoints=["recordInfo"])
    prompt = unique_prompt("[sandbox:seconds=0] dropped")
    with pytest.raises(requests.exceptions.ConnectionError):
        create(http, server, {**create_body(prompt), "callBackUrl": receiver[0]})
    answer = record(http, server, delivered_task_id(receiver))
    assert answer.status_code == 200 and answer.json()["data"]["state"] == "success"
    assert server.config.credits == 2
    stats = server.stats()
    assert stats["dropped"] == 1 and stats["create_accepted"] == 1
    assert stats["ambiguous"] == 1 and stats["ambiguous_by_prompt"] == {prompt: 1}
    assert stats["accepted_by_prompt"] == {prompt: 1}
    assert stats["create_by_code"] == {} and stats["resets"] == 0


def test_drop_spares_answers_that_create_nothing(
    http: requests.Session, server: SandboxServer
) -> None:
    task_id = create(http, server).json()["data"]["taskId"]
    server.configure(drop_rate=1.0)
    assert record(http, server, task_id).status_code == 200
    assert create(http, server, key="wrong").status_code == 401
    server.configure(credits=0)
    assert create(http, server).status_code == 402
    stats = server.stats()
    assert stats["dropped"] == 0 and stats["ambiguous"] == 0


def fault_outcomes(seed: int) -> list[str]:
    """What 12 createTask requests meet under cut and drop faults with this seed."""
    config = SandboxConfig(api_key=API_KEY, seed=seed, cut_rate=0.3, drop_rate=0.3)
    outcomes: list[str] = []
    with SandboxServer(config) as server, requests.Session() as session:
        session.trust_env = False
        for _ in range(12):
            try:
                create(session, server)
                outcomes.append("ok")
            except requests.exceptions.ChunkedEncodingError:
                outcomes.append("cut")
            except requests.exceptions.ConnectionError:
                outcomes.append("drop")
    return outcomes


def test_seeded_cuts_and_drops_repeat() -> None:
    first = fault_outcomes(seed=11)
    assert set(first) == {"ok", "cut", "drop"}
    assert fault_outcomes(seed=11) == first


def test_trickle_sends_headers_at_once_then_a_byte_per_interval(
    http: requests.Session, server: SandboxServer
) -> None:
    server.configure(trickle_rate=1.0, trickle_seconds=0.01, fault_endpoints=["createTask"])
    started = time.monotonic()
    answer = http.post(
        server.url + CREATE, json=create_body(), headers=AUTH, stream=True, timeout=(5, 0.5)
    )
    headers_after = time.monotonic() - started
    body = answer.content
    total = time.monotonic() - started
    expected = len(body) * 0.01
    assert int(answer.headers["Content-Length"]) == len(body) and expected > 0.5
    assert json.loads(body)["code"] == 200
    assert headers_after < expected / 2
    assert expected * 0.95 <= total < expected + 2.0
    stats = server.stats()
    assert stats["trickled"] == 1 and stats["ambiguous"] == 0


def test_trickle_stops_quietly_when_the_client_goes(
    server: SandboxServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sandbox.server")
    server.configure(trickle_rate=1.0, trickle_seconds=3.0)
    before = set(threading.enumerate())
    payload = json.dumps(create_body()).encode()
    head = (
        f"POST {CREATE} HTTP/1.1\r\nHost: {server.host}\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    with socket.create_connection((server.host, server.port), timeout=5) as connection:
        connection.sendall(head.encode() + payload)
        assert connection.recv(4096).startswith(b"HTTP/1.1 200 ")
        handlers = [  # found while the connection is open: once closed, it may end at once
            thread
            for thread in set(threading.enumerate()) - before
            if "process_request" in thread.name
        ]
    assert len(handlers) == 1
    handlers[0].join(timeout=1.0)
    assert not handlers[0].is_alive(), "the handler kept trickling to a closed connection"
    assert not [entry for entry in caplog.records if entry.exc_info]
    assert server.stats()["trickled"] == 1


def test_slow_answers_are_delayed(http: requests.Session, server: SandboxServer) -> None:
    server.configure(slow_rate=1.0, slow_seconds=0.3)
    started = time.monotonic()
    assert create(http, server).status_code == 200
    assert time.monotonic() - started >= 0.3
    assert server.stats()["slow_answers"] == 1


class _Receiver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    deliveries: queue.Queue[tuple[dict[str, str], bytes]] = queue.Queue()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.deliveries.put((dict(self.headers), body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, queue.Queue[tuple[dict[str, str], bytes]]]]:
    _Receiver.deliveries = queue.Queue()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/callback", _Receiver.deliveries
    httpd.shutdown()
    httpd.server_close()


def wait_for_stat(server: SandboxServer, key: str, value: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while server.stats()[key] != value:
        assert time.monotonic() < deadline, f"{key} never reached {value}"
        time.sleep(0.02)


def test_signed_callback_carries_the_final_record(
    http: requests.Session,
    server: SandboxServer,
    receiver: tuple[str, queue.Queue[tuple[dict[str, str], bytes]]],
) -> None:
    url, deliveries = receiver
    server.configure(webhook_hmac_key="whsec-test")
    body = {**create_body(), "callBackUrl": url}
    task_id = create(http, server, body).json()["data"]["taskId"]

    headers, payload = deliveries.get(timeout=WAIT_S)
    record_json = json.loads(payload)
    assert record_json["code"] == 200
    assert record_json["data"]["taskId"] == task_id
    assert record_json["data"]["state"] == "success"
    assert record_json["data"] == record(http, server, task_id).json()["data"]
    timestamp = headers["X-Webhook-Timestamp"]
    assert abs(int(timestamp) - time.time()) < 10
    message = f"{task_id}.{timestamp}".encode()
    digest = hmac.new(b"whsec-test", message, hashlib.sha256).digest()
    assert headers["X-Webhook-Signature"] == base64.b64encode(digest).decode()
    wait_for_stat(server, "callbacks_sent", 1)


def test_unsigned_callback_and_non_local_url_refused(
    http: requests.Session,
    server: SandboxServer,
    receiver: tuple[str, queue.Queue[tuple[dict[str, str], bytes]]],
) -> None:
    url, deliveries = receiver
    create(http, server, {**create_body(), "callBackUrl": url})
    create(http, server, {**create_body(), "callBackUrl": "https://hooks.example/cb"})
    headers, _ = deliveries.get(timeout=WAIT_S)
    assert "X-Webhook-Signature" not in headers
    wait_for_stat(server, "callbacks_refused", 1)
    wait_for_stat(server, "callbacks_sent", 1)


def test_control_merges_config_and_refuses_invalid_patches(
    http: requests.Session, server: SandboxServer
) -> None:
    control = SandboxControl(server.url)
    merged = control.configure(faults={500: 0.25}, fault_style="body")
    assert merged["faults"] == {"500": 0.25}
    assert merged["fault_style"] == "body"
    assert merged["api_key"] == API_KEY
    assert control.config() == merged
    for patch in (
        {"faults": {"418": 1.0}},
        {"faults": {"429": 0.7, "500": 0.7}},
        {"reset_rate": 2},
        {"rate_limit": "fast"},
        {"no_such_field": 1},
        {"cut_rate": 1.5},
        {"drop_rate": -0.1},
        {"trickle_rate": 2},
        {"trickle_seconds": -1},
        {"retry_after": "1\r\nX-Injected: yes"},
        {"retry_after": 5},
        {"fault_style": "pages"},
    ):
        answer = http.post(server.url + "/_sandbox/config", json=patch, timeout=5)
        assert answer.status_code == 400, patch
        assert answer.json()["msg"]
    assert http.post(server.url + "/_sandbox/config", json=[1], timeout=5).status_code == 400
    with pytest.raises(ValueError, match="rate limit"):
        control.configure(rate_limit="20 per 10s")
    with pytest.raises(ValueError, match="trickle_seconds"):
        control.configure(trickle_seconds=-0.5)
    assert control.config() == merged
    chaos = control.configure(
        fault_style="page", cut_rate=0.1, drop_rate=0.2, trickle_rate=0.3, trickle_seconds=0
    )
    assert (chaos["cut_rate"], chaos["drop_rate"], chaos["trickle_rate"]) == (0.1, 0.2, 0.3)
    assert chaos["fault_style"] == "page" and chaos["trickle_seconds"] == 0
    assert control.configure(retry_after="1e308")["retry_after"] == "1e308"
    assert control.configure(retry_after=None)["retry_after"] is None
    control.close()


def test_stats_count_requests_and_reset_clears_them(
    http: requests.Session, server: SandboxServer
) -> None:
    control = SandboxControl(server.url)
    prompt = unique_prompt()
    task_id = create(http, server, create_body(prompt)).json()["data"]["taskId"]
    create(http, server, key="wrong")
    record(http, server, task_id)
    record(http, server, "task_ideogram_0_unknown")
    stats = control.stats()
    assert stats["create_requests"] == 2
    assert stats["create_accepted"] == 1
    assert stats["create_by_code"] == {"200": 1, "401": 1}
    assert stats["record_requests"] == 2
    assert stats["record_by_code"] == {"200": 1, "404": 1}
    assert stats["accepted_by_prompt"] == {prompt: 1}
    assert stats["auth_headers_seen_invalid"] == 1
    assert len(stats["accepted_at"]) == 1 and abs(stats["accepted_at"][0] - time.time()) < 5
    assert stats["tasks"] == 1

    control.configure(credits=5)
    control.reset()
    cleared = control.stats()
    assert cleared["tasks"] == 0 and cleared["create_requests"] == 0
    assert cleared["create_by_code"] == {} and cleared["accepted_at"] == []
    assert control.config()["credits"] == 5
    assert record(http, server, task_id).status_code == 404
    control.close()


def test_health_and_unknown_paths(http: requests.Session, server: SandboxServer) -> None:
    health = http.get(server.url + "/healthz", timeout=5)
    assert health.status_code == 200 and health.text == "ok"
    assert http.get(server.url + "/api/v1/nothing", timeout=5).status_code == 404


def test_refuses_to_listen_beyond_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        SandboxServer(host="0.0.0.0")


@pytest.mark.parametrize(
    "args",
    [
        ["--fault", "418=1"],
        ["--fault", "429"],
        ["--rate-limit", "fast"],
        ["--host", "0.0.0.0"],
        ["--cut-rate", "1.5"],
        ["--drop-rate", "-1"],
        ["--trickle-rate", "2"],
        ["--trickle-seconds", "-1"],
        ["--retry-after", "a\x01b"],
        ["--fault-style", "pages"],
    ],
)
def test_cli_refuses_bad_options_with_exit_2(args: list[str]) -> None:
    result = CliRunner().invoke(sandbox_command, args)
    assert result.exit_code == 2
    assert "Error" in result.output


@pytest.mark.integration
def test_python_m_sandbox_runs_as_a_process() -> None:
    chaos_args = ["--cut-rate", "0.1", "--drop-rate", "0.2", "--trickle-rate", "0.3"]
    chaos_args += ["--trickle-seconds", "0.5", "--retry-after", "-5", "--fault-style", "page"]
    args = ["--generation-seconds", "0.2", "--api-key", API_KEY, *chaos_args]
    with start_sandbox(args=args) as process:
        assert process.url is not None
        control = SandboxControl(process.url)
        assert control.is_ready()
        config = control.config()
        assert config["generation_seconds"] == 0.2
        assert (config["cut_rate"], config["drop_rate"], config["trickle_rate"]) == (0.1, 0.2, 0.3)
        assert config["trickle_seconds"] == 0.5 and config["retry_after"] == "-5"
        assert config["fault_style"] == "page"
        control.close()
    assert process.popen.poll() == 0


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_ensure_redis_starts_a_throwaway_server() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    started = ensure_redis(url)
    assert started is not None
    with ManagedProcess(started):
        assert redis_ping(url)
        assert ensure_redis(url) is None
    assert not redis_ping(url)
