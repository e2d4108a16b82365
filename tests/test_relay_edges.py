"""Adversarial tests of the legacy remix relay (provider ``ideogram-remix``).

Real Redis (the policy database), a scripted relay over real HTTP on 127.0.0.1 (a
``ThreadingHTTPServer`` whose answers each test writes), the real submit and poll steps.
Each test states what must hold; a failing one is a finding.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis

from tests.policy_kit import make_services, run_steps, submit_now
from tests.relay_kit import RELAY_API_KEY, new_relay_job
from worker import keys
from worker.models import JobState
from worker.services import Services

pytestmark = pytest.mark.policy

#: One answer of the scripted relay: (HTTP status, JSON body).
Answer = tuple[int, dict[str, Any]]


class ScriptedRelay:
    """Answers ``POST /ideogram/remix`` and ``GET /ideogram/remix/<id>`` from scripts."""

    def __init__(self, remix: Callable[[int], Answer], status: Callable[[str], Answer]) -> None:
        self.remix_requests = 0
        self.status_requests: list[str] = []
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, answer: Answer) -> None:
                code, body = answer
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                relay.remix_requests += 1
                self._send(remix(relay.remix_requests))

            def do_GET(self) -> None:
                task_id = self.path.rsplit("/", 1)[-1]
                relay.status_requests.append(task_id)
                self._send(status(task_id))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def scripted_services(relay: ScriptedRelay) -> Services:
    return make_services(
        relay.url,
        ideogram_base_url=relay.url,
        ideogram_api_key=RELAY_API_KEY,
        ideogram_rate_limit="1000/1s",
        ideogram_read_timeout_s=5.0,
        ideogram_request_deadline_s=8.0,
    )


SUCCESS_IMAGES = {"created": "2026-01-01", "data": [{"url": "https://img.test/a.png"}]}


@pytest.fixture
def relay_factory(policy_redis: redis.Redis) -> Iterator[Callable[..., ScriptedRelay]]:
    started: list[ScriptedRelay] = []

    def start(remix: Callable[[int], Answer], status: Callable[[str], Answer]) -> ScriptedRelay:
        relay = ScriptedRelay(remix, status)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


def test_a_gateway_504_with_a_json_body_is_not_sent_to_the_relay_again(
    relay_factory: Callable[..., ScriptedRelay],
) -> None:
    """The relay generates inside its request. A gateway in front of it that gives up
    (AWS API Gateway answers 504 ``{"message": "Endpoint request timed out"}``, JSON) has
    passed the request on: the relay may be making (and charging) the images. The answer
    is lost like a read timeout, so the README's rule applies: never sent again."""

    def remix(n: int) -> Answer:
        if n == 1:
            return 504, {"message": "Endpoint request timed out"}
        return 200, SUCCESS_IMAGES

    relay = relay_factory(remix, lambda task_id: (404, {"message": "no such task"}))
    svc = scripted_services(relay)
    job_id, _ = new_relay_job(svc)

    steps = run_steps(svc, job_id)

    record = svc.store.get(job_id)
    assert record is not None
    assert relay.remix_requests == 1, (
        f"the relay was sent the remix request {relay.remix_requests} times after a 504 "
        f"gateway timeout (steps {steps}, final state {record.state}, "
        f"unknown_outcomes={record.unknown_outcomes}): paid twice"
    )
    assert record.fail_code == "unknown_outcome"


def test_a_relay_task_id_that_starts_with_sync_is_polled_not_failed(
    relay_factory: Callable[..., ScriptedRelay],
) -> None:
    """An asynchronous answer names the relay's own task id. If that id happens to start
    with ``sync-`` (the prefix remixq uses for its own synthetic ids of synchronous
    answers), the poll step must still ask the relay for it: the relay made (and
    charged) the task and will deliver it."""
    relay = relay_factory(
        lambda n: (
            200,
            {
                "code": 0,
                "message": "SUCCEED",
                "data": {"task_id": "sync-7f3a", "task_status": "submitted"},
            },
        ),
        lambda task_id: (
            200,
            {
                "code": 0,
                "data": {
                    "task_id": task_id,
                    "task_status": "succeed",
                    "task_result": {"images": [{"url": "https://img.test/done.png"}]},
                },
            },
        ),
    )
    svc = scripted_services(relay)
    job_id, _ = new_relay_job(svc)

    steps = run_steps(svc, job_id)

    record = svc.store.get(job_id)
    assert record is not None and relay.remix_requests == 1
    assert record.state is JobState.SUCCEEDED, (
        f"a paid relay task named sync-7f3a was never polled ({relay.status_requests}); "
        f"the job ended {record.state} {record.fail_code}: {record.fail_msg} (steps {steps})"
    )
    assert record.result_urls == ["https://img.test/done.png"]


def test_a_relay_only_worker_leaves_a_kie_job_for_a_worker_that_can_send_it(
    relay_factory: Callable[..., ScriptedRelay],
) -> None:
    """A fleet may run relay-only workers (``IDEOGRAM_*`` without ``KIE_API_KEY``, which
    the README allows) beside kie workers; both consume the one ``submit`` queue. A kie
    job that lands on a relay-only worker must wait for a kie worker (as the poll step
    does: "another worker may have"), not be failed for good."""
    relay = relay_factory(lambda n: (200, SUCCESS_IMAGES), lambda t: (404, {}))
    relay_only = make_services(
        relay.url,
        kie_api_key=None,
        ideogram_base_url=relay.url,
        ideogram_api_key=RELAY_API_KEY,
        ideogram_read_timeout_s=5.0,
        ideogram_request_deadline_s=8.0,
    )
    from tests.policy_kit import new_job

    job_id, _ = new_job(relay_only)
    now = relay_only.clock.now()
    relay_only.broker.zadd(keys.provider_workers("kie"), {"a-kie-worker:1": now})

    step = submit_now(relay_only, job_id)

    record = relay_only.store.get(job_id)
    assert record is not None
    assert not record.finished, (
        f"a kie job met by a relay-only worker ended {record.state} {record.fail_code} "
        f"(step {step!r}) although a kie worker of the same fleet could send it"
    )
