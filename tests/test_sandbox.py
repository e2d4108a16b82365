"""The sandbox over real HTTP: kie.ai shapes, validation, fault injection, callbacks, control."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import queue
import shutil
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


def test_mixed_style_answers_both_ways(http: requests.Session, server: SandboxServer) -> None:
    server.configure(faults={455: 1.0}, fault_style="mixed")
    statuses = {create(http, server).status_code for _ in range(20)}
    assert statuses == {200, 455}


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
    ):
        answer = http.post(server.url + "/_sandbox/config", json=patch, timeout=5)
        assert answer.status_code == 400, patch
        assert answer.json()["msg"]
    assert http.post(server.url + "/_sandbox/config", json=[1], timeout=5).status_code == 400
    with pytest.raises(ValueError, match="rate limit"):
        control.configure(rate_limit="20 per 10s")
    assert control.config() == merged
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
    [["--fault", "418=1"], ["--fault", "429"], ["--rate-limit", "fast"], ["--host", "0.0.0.0"]],
)
def test_cli_refuses_bad_options_with_exit_2(args: list[str]) -> None:
    result = CliRunner().invoke(sandbox_command, args)
    assert result.exit_code == 2
    assert "Error" in result.output


def test_python_m_sandbox_runs_as_a_process() -> None:
    with start_sandbox(args=["--generation-seconds", "0.2", "--api-key", API_KEY]) as process:
        assert process.url is not None
        control = SandboxControl(process.url)
        assert control.is_ready()
        assert control.config()["generation_seconds"] == 0.2
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
