"""The legacy remix relay (provider ``ideogram-remix``) step by step: real Redis, the
sandbox over HTTP, no worker.

Each test drives :func:`worker.policies.submit.submit_step` and
:func:`worker.policies.poll.poll_step` for relay jobs and checks the record and what the
sandbox's relay endpoint received.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from tests.policy_kit import API_KEY, make_services, new_job, run_steps, sent, submit_now, token_of
from tests.relay_kit import RELAY, RELAY_API_KEY, new_relay_job, relay_payload
from worker import keys
from worker.fleet.dispatcher import TICK_S, Dispatcher
from worker.models import JobState
from worker.policies.poll import poll_step
from worker.services import Services
from worker.store.blobs import put
from worker.store.lines import backstop_s
from worker.store.publisher import SUBMIT_QUEUE
from worker.upstreams.errors import UnexpectedCodeError

pytestmark = pytest.mark.policy

RELAY_FAST = {
    "ideogram_rate_limit": "1000/1s",
    "ideogram_read_timeout_s": 5.0,
    "ideogram_request_deadline_s": 8.0,
}


@pytest.fixture
def relay_upstream() -> Iterator[SandboxServer]:
    config = SandboxConfig(api_key=API_KEY, relay_api_key=RELAY_API_KEY, generation_seconds=0.3)
    server = SandboxServer(config).start()
    yield server
    server.stop()


def relay_services(upstream: SandboxServer, **overrides: Any) -> Services:
    fields = {"ideogram_base_url": upstream.url, "ideogram_api_key": RELAY_API_KEY, **RELAY_FAST}
    return make_services(upstream.url, **{**fields, **overrides})


@pytest.fixture
def rsvc(policy_redis: redis.Redis, relay_upstream: SandboxServer) -> Services:
    return relay_services(relay_upstream)


def relay_stats(upstream: SandboxServer) -> dict[str, Any]:
    stats: dict[str, Any] = upstream.stats()
    return stats


def relay_sent(upstream: SandboxServer, prompt: str) -> int:
    return int(relay_stats(upstream)["relay_requests_by_prompt"].get(prompt, 0))


def open_attempt(svc: Services, job_id: str) -> str:
    """Open a createTask attempt for the job, as a submit step does before sending."""
    attempt = svc.store.new_attempt_id()
    assert svc.store.begin_attempt(job_id, attempt, 60).status == "ok"
    return attempt


def run_until_finished(svc: Services, job_id: str, timeout: float = 20.0) -> list[str]:
    """Run the job's steps until it finishes; fails the test when it does not in time."""
    steps = run_steps(svc, job_id, timeout)
    record = svc.store.get(job_id)
    if record is None or not record.finished:
        raise AssertionError(f"job {job_id} not finished after {timeout}s: {steps}")
    return steps


def test_a_sync_answer_finishes_the_job_in_the_submit_step(
    rsvc: Services, relay_upstream: SandboxServer
) -> None:
    prompt = "café ☕ 夜の街 50% & more"
    job_id, _ = new_relay_job(rsvc, prompt, num_images=2, style_type="ANIME")

    assert submit_now(rsvc, job_id) == "succeeded"

    record = rsvc.store.get(job_id)
    assert record is not None and record.state is JobState.SUCCEEDED
    assert (record.provider, record.model) == (RELAY, "V_2")
    assert record.upstream_task_id and record.upstream_task_id.startswith("sync-")
    assert len(record.result_urls) == 2 and record.submit_attempts == 1
    image = requests.get(record.result_urls[0], timeout=5)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    stats = relay_stats(relay_upstream)
    assert (stats["relay_requests"], stats["relay_accepted"], stats["create_requests"]) == (1, 1, 0)
    seen = stats["relay_last_request"]
    assert seen["image_request"]["prompt"] == prompt  # plain UTF-8, not percent-encoded
    assert seen["image_request"]["image_weight"] == 50 and "image_file" not in seen["image_request"]
    assert seen["image_type"] == "image/png"
    assert rsvc.store.scheduled(job_id) is None


def test_an_async_answer_is_polled_at_the_status_endpoint(
    rsvc: Services, relay_upstream: SandboxServer
) -> None:
    relay_upstream.configure(relay_mode="async", generation_seconds=0.6)
    job_id, _ = new_relay_job(rsvc)

    assert submit_now(rsvc, job_id) == "accepted"
    record = rsvc.store.get(job_id)
    assert record is not None and record.state is JobState.SUBMITTED
    assert record.upstream_task_id and not record.upstream_task_id.startswith("sync-")

    steps = run_until_finished(rsvc, job_id)

    record = rsvc.store.get(job_id)
    assert record is not None and record.state is JobState.SUCCEEDED, record
    assert record.result_urls and "pending" in steps
    stats = relay_stats(relay_upstream)
    assert stats["relay_status_requests"] >= 2 and stats["record_requests"] == 0


def test_an_async_failure_reports_the_relays_reason(
    rsvc: Services, relay_upstream: SandboxServer
) -> None:
    relay_upstream.configure(relay_mode="async")
    job_id, _ = new_relay_job(rsvc, "[sandbox:fail] no luck")
    run_until_finished(rsvc, job_id)
    record = rsvc.store.get(job_id)
    assert record is not None and record.state is JobState.FAILED
    assert record.fail_code == "fail" and "sandbox" in (record.fail_msg or "")


@pytest.mark.parametrize("code", [429, 500])
def test_429_and_500_are_retried_with_backoff(
    rsvc: Services, relay_upstream: SandboxServer, code: int
) -> None:
    relay_upstream.configure(faults={code: 1.0}, fault_endpoints=["remix"])
    job_id, prompt = new_relay_job(rsvc)

    assert submit_now(rsvc, job_id) == "retry"
    assert rsvc.store.get_internal(job_id, "_retries") == 1
    due = rsvc.store.scheduled(job_id)
    assert due is not None and due > rsvc.clock.now() - 0.01
    record = rsvc.store.get(job_id)
    assert record is not None and record.unknown_outcomes == 0

    relay_upstream.configure(faults={})
    run_until_finished(rsvc, job_id)
    record = rsvc.store.get(job_id)
    assert record is not None and record.state is JobState.SUCCEEDED
    assert relay_sent(relay_upstream, prompt) == 2


def test_a_relay_455_pauses_the_relay_key_only(
    rsvc: Services, relay_upstream: SandboxServer
) -> None:
    relay_upstream.configure(faults={455: 1.0}, fault_endpoints=["remix"])
    for _ in range(3):
        job_id, _ = new_relay_job(rsvc)
        assert submit_now(rsvc, job_id) == "held"

    relay = rsvc.for_provider(RELAY)
    state = relay.pause.state()
    assert state is not None and state.reason == "455"
    assert rsvc.pause.state() is None and relay.api_key_id != rsvc.api_key_id

    kie_job, kie_prompt = new_job(rsvc)
    assert submit_now(rsvc, kie_job) == "accepted"
    assert sent(relay_upstream, kie_prompt) == 1

    waiting, prompt = new_relay_job(rsvc)
    assert submit_now(rsvc, waiting) == "pause"
    assert relay_sent(relay_upstream, prompt) == 0


def test_a_relay_pause_is_probed_at_the_relay_and_ends_when_it_answers(
    rsvc: Services, relay_upstream: SandboxServer
) -> None:
    relay = rsvc.for_provider(RELAY)
    assert relay.pause.trip("455", "maintenance")
    relay_upstream.configure(faults={455: 1.0}, fault_endpoints=["remix", "remixStatus"])
    time.sleep(rsvc.settings.remix_pause_probe_s + 0.1)
    job_id, prompt = new_relay_job(rsvc)
    assert submit_now(rsvc, job_id) == "pause"  # the probe got 455 too
    assert relay_stats(relay_upstream)["relay_status_requests"] == 1

    relay_upstream.configure(faults={})
    time.sleep(2 * rsvc.settings.remix_pause_probe_s + 0.1)
    assert submit_now(rsvc, job_id) == "succeeded"
    assert relay.pause.state() is None and relay_sent(relay_upstream, prompt) == 1


def test_a_kie_455_does_not_pause_relay_jobs(rsvc: Services, relay_upstream: SandboxServer) -> None:
    assert rsvc.pause.trip("455", "maintenance")
    job_id, _ = new_relay_job(rsvc)
    assert submit_now(rsvc, job_id) == "succeeded"


def test_a_sync_read_timeout_fails_unknown_outcome_after_one_request(
    policy_redis: redis.Redis, relay_upstream: SandboxServer
) -> None:
    svc = relay_services(
        relay_upstream, ideogram_read_timeout_s=0.5, ideogram_request_deadline_s=1.0
    )
    job_id, prompt = new_relay_job(svc, "[sandbox:seconds=2] slow generation")

    assert submit_now(svc, job_id) == "failed"

    record = svc.store.get(job_id)
    assert record is not None and record.fail_code == "unknown_outcome"
    assert record.unknown_outcomes == 1 and "submit it again" in (record.fail_msg or "")
    assert submit_now(svc, job_id) == "finished"
    time.sleep(2.0)  # the relay finishes generating; nothing is sent again
    assert relay_sent(relay_upstream, prompt) == 1


def test_a_lost_earlier_attempt_is_not_sent_again(
    rsvc: Services, relay_upstream: SandboxServer
) -> None:
    job_id, prompt = new_relay_job(rsvc)
    attempt = open_attempt(rsvc, job_id)
    rsvc.store.end_attempt(job_id, attempt, unknown=True)  # a worker died mid-request

    assert submit_now(rsvc, job_id) == "failed"
    record = rsvc.store.get(job_id)
    assert record is not None and record.fail_code == "unknown_outcome"
    assert relay_sent(relay_upstream, prompt) == 0


def test_422_fails_the_job_for_good(rsvc: Services, relay_upstream: SandboxServer) -> None:
    job_id, prompt = new_relay_job(rsvc, "[sandbox:create=422] unsafe")
    assert submit_now(rsvc, job_id) == "failed"
    record = rsvc.store.get(job_id)
    assert record is not None and record.fail_code == "422"
    assert relay_sent(relay_upstream, prompt) == 1


def test_the_relay_refuses_aspect_ratio_with_resolution(
    rsvc: Services, relay_upstream: SandboxServer
) -> None:
    """The model refuses it at enqueue; the relay itself too, as a permanent error."""
    from tests.relay_kit import png_bytes

    ref = put(rsvc.blobs, png_bytes(), "image/png", "src.png")
    both = {"prompt": "both", "aspect_ratio": "ASPECT_1_1", "resolution": "RESOLUTION_1024_1024"}
    with pytest.raises(UnexpectedCodeError) as caught:
        rsvc.relay_client().remix(both, png_bytes(), ref)
    assert caught.value.fail_code == "400" and "aspect_ratio" in caught.value.message


def test_a_relay_job_on_a_worker_without_relay_settings_fails(
    policy_redis: redis.Redis, relay_upstream: SandboxServer
) -> None:
    svc = make_services(relay_upstream.url)
    job_id, prompt = new_relay_job(svc)
    assert submit_now(svc, job_id) == "failed"
    record = svc.store.get(job_id)
    assert record is not None and record.fail_code == "provider_not_configured"
    assert "IDEOGRAM_API_KEY" in (record.fail_msg or "")
    assert relay_sent(relay_upstream, prompt) == 0


def test_a_kie_job_on_a_relay_only_worker_fails(
    policy_redis: redis.Redis, relay_upstream: SandboxServer
) -> None:
    svc = relay_services(relay_upstream, kie_api_key=None)
    job_id, prompt = new_job(svc)
    assert submit_now(svc, job_id) == "failed"
    record = svc.store.get(job_id)
    assert record is not None and record.fail_code == "provider_not_configured"
    assert sent(relay_upstream, prompt) == 0


def test_a_missing_image_fails_the_job_with_one_line(
    rsvc: Services, relay_upstream: SandboxServer
) -> None:
    job_id, prompt = new_relay_job(rsvc)
    request = rsvc.store.get_internal(job_id, "_request")
    rsvc.store.redis.delete(keys.blob(request["image_file"]["blob"]))
    assert submit_now(rsvc, job_id) == "failed"
    record = rsvc.store.get(job_id)
    assert record is not None and record.fail_code == "image_missing"
    assert "\n" not in (record.fail_msg or "") and "no longer stored" in (record.fail_msg or "")
    assert relay_sent(relay_upstream, prompt) == 0


def test_a_poll_of_a_sync_task_never_asks_the_relay(
    rsvc: Services, relay_upstream: SandboxServer
) -> None:
    """The images came with the answer; a poll (say, after a lost finish) uses them."""
    job_id, _ = new_relay_job(rsvc)
    attempt = open_attempt(rsvc, job_id)
    rsvc.store.update(job_id, _relay_results=["http://127.0.0.1:9/files/x/0.png"])
    rsvc.store.accept(job_id, attempt, f"sync-{attempt}", 0.0)

    assert poll_step(rsvc, job_id, token_of(rsvc, job_id)) == "succeeded"
    record = rsvc.store.get(job_id)
    assert record is not None and record.result_urls == ["http://127.0.0.1:9/files/x/0.png"]
    assert relay_stats(relay_upstream)["relay_status_requests"] == 0


def test_relay_jobs_are_polled_normally_when_kie_callbacks_are_on(
    policy_redis: redis.Redis, relay_upstream: SandboxServer
) -> None:
    svc = relay_services(relay_upstream, kie_callback_url="http://127.0.0.1:9/callback")
    relay_upstream.configure(relay_mode="async")
    job_id, _ = new_relay_job(svc)
    assert submit_now(svc, job_id) == "accepted"
    due = svc.store.scheduled(job_id)
    initial = svc.settings.remix_poll_initial_s
    assert due is not None and due <= svc.clock.now() + initial + 0.1
    assert "callback" not in str(relay_stats(relay_upstream)["relay_last_request"])


def test_a_busy_kie_line_does_not_keep_relay_jobs_waiting(
    policy_redis: redis.Redis, relay_upstream: SandboxServer
) -> None:
    svc = relay_services(relay_upstream, kie_rate_limit="1000/1s")
    for _ in range(300):
        new_job(svc)
    dispatcher = Dispatcher(svc, 2)
    sent_ids: set[str] = set()

    def rounds(count: int) -> None:  # a busy fleet: it takes 5 submits between rounds
        for _ in range(count):
            dispatcher.tick()
            time.sleep(dispatcher.seconds_to_next_round(TICK_S))
            for body in svc.broker.lrange(SUBMIT_QUEUE, 0, -1):
                kwargs = json.loads(base64.b64decode(json.loads(body)["body"]))[1]
                sent_ids.add(kwargs["job_id"])
            svc.broker.ltrim(SUBMIT_QUEUE, 0, -6)

    rounds(4)  # the fleet is busy with kie's line when the relay jobs come
    relay_ids = {uuid.uuid4().hex for _ in range(5)}
    for job_id in relay_ids:  # waiting in the relay's line, as enqueued
        payload, _ = relay_payload(svc, f"relay {job_id}")
        svc.store.create(job_id, payload, due_in=backstop_s(svc.settings), provider=RELAY)
    rounds(10)
    assert relay_ids <= sent_ids, f"{len(relay_ids - sent_ids)} relay jobs still waiting"
