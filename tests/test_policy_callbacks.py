"""Upstream callbacks step by step: real Redis, the sandbox over HTTP, no worker, no app.

Each test signs a callback the way kie.ai does (the sandbox's own signer, not the
receiver's), hands it to the receiver's logic (:func:`producers.http.callbacks.respond`,
what the route runs once it has read the body) and checks the answer, the record, the
schedule and what the sandbox was asked. The callback URL names a host the sandbox never
delivers to, so every callback here is one the test sends.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producers.http.callbacks import respond
from producers.http.metrics import PROCESS_COUNTERS
from sandbox.callbacks import SIGNATURE_HEADER, TIMESTAMP_HEADER, webhook_signature
from sandbox.launch import free_port, start_redis
from sandbox.server import SandboxServer
from tests.policy_kit import INPUT, accepted, make_services, new_job, sent, submit_now, token_of
from worker import keys
from worker.models import JobRecord, JobState
from worker.policies import submit as submit_policy
from worker.policies.callbacks import CLOCK_SKEW_S, CallbackRefused, signature_for, verify
from worker.policies.poll import poll_step
from worker.policies.submit import record_acceptance
from worker.services import Services
from worker.store.jobs import JobStore
from worker.upstreams.errors import ValidationFailedError

pytestmark = pytest.mark.policy

HMAC_KEY = f"whk-policy-{uuid.uuid4().hex}"
#: Not a local address: the sandbox never delivers there, the tests send every callback.
CALLBACK_URL = "https://callbacks.example.test/v1/callbacks/kie"
#: A prompt directive: the sandbox's task is final the moment it is created.
INSTANT = "[sandbox:seconds=0]"
WINDOW_S = 300


@pytest.fixture
def cb(policy_redis: redis.Redis, upstream: SandboxServer) -> Services:
    """Services with callbacks on (and the safety-net poll far away)."""
    return callback_services(upstream)


def callback_services(upstream: SandboxServer, **overrides: Any) -> Services:
    return make_services(
        upstream.url,
        kie_callback_url=CALLBACK_URL,
        kie_webhook_hmac_key=HMAC_KEY,
        remix_callback_poll_s=30.0,
        remix_callback_wait_s=120.0,
        kie_callback_window_s=WINDOW_S,
        **overrides,
    )


# ----------------------------------------------------------------------------- helpers


def result_urls(task_id: str) -> list[str]:
    return [f"https://results.example.test/{task_id}/0.png"]


def body_for(task_id: str, state: str = "success", id_field: str = "taskId") -> bytes:
    """A callback body as kie.ai sends it: the recordInfo envelope of the final record."""
    data: dict[str, Any] = {id_field: task_id, "state": state, "model": "ideogram/character-remix"}
    if state == "success":
        data["resultJson"] = json.dumps({"resultUrls": result_urls(task_id)})
    elif state == "fail":
        data.update(failCode="501", failMsg="generation failed (test)")
    return json.dumps({"code": 200, "msg": "success", "data": data}).encode()


def headers_for(
    task_id: str, *, key: str = HMAC_KEY, at: int | None = None, timestamp: str | None = None
) -> dict[str, str]:
    """kie.ai's headers: ``X-Webhook-Timestamp`` and the signature over taskId.timestamp."""
    when = int(time.time()) if at is None else at
    stamp = str(when) if timestamp is None else timestamp
    return {
        "content-type": "application/json",
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: webhook_signature(key, task_id, when),
    }


def call(
    svc: Services,
    task_id: str,
    job_id: str | None = None,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> int:
    """Send one callback to the receiver's logic; its HTTP status."""
    response = respond(
        svc, body_for(task_id) if body is None else body, headers or headers_for(task_id), job_id
    )
    return response.status_code


def submitted_job(svc: Services, label: str = "cb") -> tuple[str, str]:
    """A job accepted upstream by one submit step; ``(job_id, task_id)``."""
    job_id, _ = new_job(svc, prompt=f"{label} {uuid.uuid4().hex[:10]}")
    assert submit_now(svc, job_id) == "accepted"
    record = svc.store.get(job_id)
    assert record is not None and record.upstream_task_id
    return job_id, record.upstream_task_id


def lost_answer_job(svc: Services, *, for_job: str | None = None) -> tuple[str, str, str]:
    """A job whose createTask was accepted upstream but whose answer never arrived.

    The attempt is left open (its worker died); ``(job_id, task_id, attempt_id)``.
    ``for_job``: the job id the upstream task's ``callBackUrl`` names (default: this job).
    """
    prompt = f"lost {uuid.uuid4().hex[:10]} {INSTANT}"
    job_id, _ = new_job(svc, prompt=prompt)
    attempt = svc.store.new_attempt_id()
    assert svc.store.begin_attempt(job_id, attempt, svc.settings.attempt_settle_s).status == "ok"
    url = svc.settings.callback_url_for(for_job or job_id)
    task_id = svc.client().create_task({"prompt": prompt, **INPUT}, url)
    return job_id, task_id, attempt


def record(svc: Services, job_id: str) -> JobRecord:
    found = svc.store.get(job_id)
    assert found is not None
    return found


def refused(svc: Services) -> dict[str, int]:
    prefix = "callbacks_refused_total:"
    return {k[len(prefix) :]: v for k, v in svc.metrics.read().items() if k.startswith(prefix)}


def record_infos(upstream: SandboxServer) -> int:
    return int(upstream.stats()["record_requests"])


# ----------------------------------------------------------------------------- valid callbacks


def test_a_signed_callback_finishes_the_job_at_once_and_the_job_leaves_the_schedule(
    cb: Services, upstream: SandboxServer
) -> None:
    job_id, task_id = submitted_job(cb)
    due = cb.store.scheduled(job_id)
    assert due is not None and due > cb.clock.now() + 20  # the safety-net poll, far away
    token = token_of(cb, job_id)
    finished = cb.store.redis.pubsub()
    finished.subscribe(cb.store.finished_channel)

    assert call(cb, task_id) == 200

    done = record(cb, job_id)
    assert done.state is JobState.SUCCEEDED and done.result_urls == result_urls(task_id)
    assert done.finished_at is not None and done.polls == 0
    assert cb.store.scheduled(job_id) is None
    assert job_id in _published(finished)
    assert poll_step(cb, job_id, token) == "finished"  # a later poll of its batch
    assert record_infos(upstream) == 0
    assert cb.metrics.read().get("callbacks_total:valid") == 1


def _published(pubsub: Any) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
        if message and message["type"] == "message":
            seen.append(message["data"].decode())
    pubsub.close()
    return seen


def test_data_task_id_is_accepted_like_task_id(cb: Services) -> None:
    job_id, task_id = submitted_job(cb)

    assert call(cb, task_id, body=body_for(task_id, id_field="task_id")) == 200

    assert record(cb, job_id).state is JobState.SUCCEEDED


def test_a_failed_generation_fails_the_job_with_the_upstream_code(cb: Services) -> None:
    job_id, task_id = submitted_job(cb)

    assert call(cb, task_id, body=body_for(task_id, state="fail")) == 200

    done = record(cb, job_id)
    assert (done.state, done.fail_code, done.fail_msg) == (
        JobState.FAILED,
        "501",
        "generation failed (test)",
    )


def test_a_callback_that_is_not_final_changes_nothing(cb: Services) -> None:
    job_id, task_id = submitted_job(cb)
    before = record(cb, job_id)

    assert call(cb, task_id, body=body_for(task_id, state="generating")) == 200

    assert record(cb, job_id) == before


def test_a_duplicate_callback_and_a_late_poll_change_nothing(
    cb: Services, upstream: SandboxServer
) -> None:
    job_id, task_id = submitted_job(cb)
    assert call(cb, task_id) == 200
    done = record(cb, job_id)

    # kie.ai delivers again with a new timestamp (a new signature): not a replay, a no-op.
    again = headers_for(task_id, at=int(time.time()) + 1)
    assert call(cb, task_id, body=body_for(task_id, state="fail"), headers=again) == 200

    assert record(cb, job_id) == done
    assert poll_step(cb, job_id, token_of(cb, job_id)) == "finished"
    assert record(cb, job_id) == done


def test_the_job_id_parameter_does_not_redirect_a_known_task(cb: Services) -> None:
    """The signature does not cover ``job_id``: a known task finishes its own job only."""
    job_id, task_id = submitted_job(cb)
    other, _ = new_job(cb)

    assert call(cb, task_id, other) == 200

    assert record(cb, job_id).state is JobState.SUCCEEDED
    assert record(cb, other).state is JobState.QUEUED


# ----------------------------------------------------------------------------- refusals


def test_forged_stale_future_malformed_and_replayed_callbacks_are_refused_alike(
    cb: Services,
) -> None:
    job_id, task_id = submitted_job(cb)
    before = record(cb, job_id)
    now = int(time.time())
    forged = headers_for(task_id)
    forged[SIGNATURE_HEADER] = forged[SIGNATURE_HEADER][:-4] + "AAA="
    attempts = {
        "forged": (body_for(task_id), forged),
        "wrong key": (body_for(task_id), headers_for(task_id, key="not-the-key")),
        "stale": (body_for(task_id), headers_for(task_id, at=now - WINDOW_S - 5)),
        "future": (body_for(task_id), headers_for(task_id, at=now + WINDOW_S + 5)),
        "no signature": (body_for(task_id), {TIMESTAMP_HEADER: str(now)}),
        "no timestamp": (body_for(task_id), {SIGNATURE_HEADER: "x"}),
        "not json": (b"{not json", headers_for(task_id)),
        "no data": (b'{"code": 200}', headers_for(task_id)),
        "no task id": (b'{"data": {"state": "success"}}', headers_for(task_id)),
        "task id a number": (b'{"data": {"taskId": 7}}', headers_for("7")),
        "deep json": (b"[" * 100_000 + b"]" * 100_000, headers_for(task_id)),
        "not utf-8": (b'{"data": {"taskId": "\xff"}}', headers_for(task_id)),
    }
    counted_before = process_refusals()
    answers = {name: respond(cb, body, headers, None) for name, (body, headers) in attempts.items()}

    assert {name: a.status_code for name, a in answers.items()} == dict.fromkeys(attempts, 401)
    # The caller is never told which check failed.
    assert {(a.body, tuple(sorted(a.headers.items()))) for a in answers.values()} == {
        (answers["forged"].body, tuple(sorted(answers["forged"].headers.items())))
    }
    assert record(cb, job_id) == before
    assert sum(counted_since(counted_before, process_refusals()).values()) == len(attempts)
    assert refused(cb) == {}


@pytest.mark.parametrize(
    "timestamp",
    [
        "1e10",
        "-5",
        "+1700000000",
        "0x10",
        "1_700_000_000",
        "1700000000.0",
        "",
        " ",
        "\u0661\u0667\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660",  # Arabic-Indic digits
        "17000000\u00b2",  # a superscript two: isdigit() says yes, int() says no
        "9" * 40,
    ],
)
def test_odd_timestamps_are_refused_never_an_error(cb: Services, timestamp: str) -> None:
    job_id, task_id = submitted_job(cb)
    headers = headers_for(task_id, timestamp=timestamp)

    assert call(cb, task_id, headers=headers) == 401
    assert record(cb, job_id).state is JobState.SUBMITTED


def test_a_replay_within_the_window_is_refused_and_counted(cb: Services) -> None:
    job_id, task_id = submitted_job(cb)
    headers = headers_for(task_id)
    assert call(cb, task_id, headers=headers) == 200

    assert call(cb, task_id, headers=headers) == 401
    assert call(cb, task_id, body=body_for(task_id, state="fail"), headers=headers) == 401

    assert refused(cb) == {"replay": 2}
    assert record(cb, job_id).state is JobState.SUCCEEDED


def test_a_replay_after_the_window_is_refused_as_stale(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = make_services(
        upstream.url,
        kie_callback_url=CALLBACK_URL,
        kie_webhook_hmac_key=HMAC_KEY,
        kie_callback_window_s=1,
    )
    job_id, task_id = submitted_job(svc)
    headers = headers_for(task_id)
    body = body_for(task_id, state="generating")
    assert call(svc, task_id, body=body, headers=headers) == 200
    seen = svc.store.redis.keys(keys.callback_seen("*"))
    assert len(seen) == 1 and 0 < svc.store.redis.ttl(seen[0]) <= 1 + CLOCK_SKEW_S + 1

    time.sleep(2.2)
    counted_before = process_refusals()

    assert call(svc, task_id, headers=headers) == 401
    assert counted_since(counted_before, process_refusals()) == {"stale": 1}
    assert refused(svc) == {}
    assert record(svc, job_id).state is JobState.SUBMITTED


def test_without_an_hmac_key_every_callback_is_refused(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = make_services(upstream.url, kie_callback_url=CALLBACK_URL)
    job_id, task_id = submitted_job(svc)
    counted_before = process_refusals()

    assert call(svc, task_id) == 401
    assert call(svc, task_id, headers=headers_for(task_id, key="")) == 401

    assert record(svc, job_id).state is JobState.SUBMITTED
    assert counted_since(counted_before, process_refusals()) == {"disabled": 2}
    assert refused(svc) == {}


def test_an_unknown_task_without_a_job_id_is_refused(cb: Services, upstream: SandboxServer) -> None:
    job_id, task_id, _ = lost_answer_job(cb)

    assert call(cb, task_id) == 401

    assert record(cb, job_id).upstream_task_id is None
    assert refused(cb) == {"unknown_task": 1}
    assert record_infos(upstream) == 0


@pytest.mark.parametrize("job_id", ["no-such-job", "x" * 10_000, "", "../../etc"])
def test_an_unknown_task_naming_no_usable_job_is_refused(
    cb: Services, upstream: SandboxServer, job_id: str
) -> None:
    _, task_id, _ = lost_answer_job(cb)

    assert call(cb, task_id, job_id) == 401

    assert record_infos(upstream) == 0


def test_an_unknown_task_naming_a_job_that_lost_no_answer_is_refused(
    cb: Services, upstream: SandboxServer
) -> None:
    """A queued job with no attempt open and no unknown outcome was never sent."""
    _, task_id, _ = lost_answer_job(cb)
    innocent, _ = new_job(cb)
    before = record(cb, innocent)

    assert call(cb, task_id, innocent) == 401

    assert record(cb, innocent) == before
    assert record_infos(upstream) == 0


def test_a_callback_for_a_cancelled_job_is_refused(cb: Services, upstream: SandboxServer) -> None:
    job_id, _ = new_job(cb)
    assert cb.store.cancel(job_id) == "cancelled"
    _, task_id, _ = lost_answer_job(cb, for_job=job_id)
    before = record(cb, job_id)

    assert call(cb, task_id, job_id) == 401

    assert record(cb, job_id) == before


def test_adoption_is_refused_when_the_upstream_task_names_another_job(
    cb: Services, upstream: SandboxServer
) -> None:
    """A validly signed callback for some other job's lost task, aimed at this one."""
    victim, _, _ = lost_answer_job(cb)
    _, task_id, _ = lost_answer_job(cb)  # its callBackUrl names its own job
    before = record(cb, victim)

    assert call(cb, task_id, victim) == 401

    assert record(cb, victim) == before
    assert refused(cb) == {"unconfirmed": 1}
    assert record_infos(upstream) == 1


def test_adoption_is_refused_for_a_task_the_upstream_does_not_know(
    cb: Services, upstream: SandboxServer
) -> None:
    job_id, _, _ = lost_answer_job(cb)
    before = record(cb, job_id)

    assert call(cb, "task_never_created", job_id) == 401

    assert record(cb, job_id) == before
    assert refused(cb) == {"unconfirmed": 1}


# ----------------------------------------------------------------------------- adoption


def test_a_task_whose_worker_died_mid_create_task_is_adopted(
    cb: Services, upstream: SandboxServer
) -> None:
    job_id, task_id, _ = lost_answer_job(cb)

    assert call(cb, task_id, job_id) == 200

    done = record(cb, job_id)
    assert done.state is JobState.SUCCEEDED and done.upstream_task_id == task_id
    assert done.result_urls and done.attempt_started_at is None
    assert not done.possibly_paid_twice and done.extra_task_ids == []
    assert cb.store.job_for_task(task_id) == job_id
    assert cb.store.scheduled(job_id) is None
    assert record_infos(upstream) == 1  # the one confirmation
    assert submit_now(cb, job_id) == "finished"


def test_a_task_whose_answer_was_lost_is_adopted_and_not_flagged_as_paid_twice(
    cb: Services, upstream: SandboxServer
) -> None:
    """The attempt closed as unknown (a timeout): the task that turns up is that attempt's."""
    job_id, task_id, attempt = lost_answer_job(cb)
    assert cb.store.end_attempt(job_id, attempt, unknown=True)

    assert call(cb, task_id, job_id) == 200

    done = record(cb, job_id)
    assert done.state is JobState.SUCCEEDED and done.upstream_task_id == task_id
    assert done.unknown_outcomes == 1 and not done.possibly_paid_twice
    prompt = json.loads(cb.store.redis.hget(keys.job(job_id), "_request"))["prompt"]
    assert (sent(upstream, prompt), accepted(upstream, prompt)) == (1, 1)


def test_two_lost_answers_then_one_adopted_task_is_flagged_as_possibly_paid_twice(
    cb: Services,
) -> None:
    job_id, task_id, attempt = lost_answer_job(cb)
    assert cb.store.end_attempt(job_id, attempt, unknown=True)
    second = cb.store.new_attempt_id()
    assert cb.store.begin_attempt(job_id, second, cb.settings.attempt_settle_s).status == "ok"
    assert cb.store.end_attempt(job_id, second, unknown=True)

    assert call(cb, task_id, job_id) == 200

    done = record(cb, job_id)
    assert done.state is JobState.SUCCEEDED and done.upstream_task_id == task_id
    assert done.unknown_outcomes == 2 and done.possibly_paid_twice


def test_a_callback_racing_the_workers_own_accept_records_the_task_once(cb: Services) -> None:
    """The callback comes before the worker wrote the task it holds."""
    job_id, task_id, attempt = lost_answer_job(cb)

    assert call(cb, task_id, job_id) == 200
    assert record_acceptance(cb, job_id, attempt, task_id) == "accepted"

    done = record(cb, job_id)
    assert done.state is JobState.SUCCEEDED and done.upstream_task_id == task_id
    assert done.extra_task_ids == [] and not done.possibly_paid_twice
    assert done.unknown_outcomes == 0


def test_the_workers_accept_racing_a_callback_from_threads(cb: Services) -> None:
    job_id, task_id, attempt = lost_answer_job(cb)
    answers: list[Any] = []
    racers = [
        threading.Thread(target=lambda: answers.append(call(cb, task_id, job_id))),
        threading.Thread(
            target=lambda: answers.append(record_acceptance(cb, job_id, attempt, task_id))
        ),
    ]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(10)

    assert sorted(map(str, answers)) == ["200", "accepted"]
    done = record(cb, job_id)
    assert done.state is JobState.SUCCEEDED and done.upstream_task_id == task_id
    assert done.extra_task_ids == [] and not done.possibly_paid_twice


class AcceptedMeanwhile(JobStore):
    """The job store, but the worker's own accept of the task lands right after a callback
    found the task unknown."""

    def __init__(self, svc: Services, job_id: str, attempt: str) -> None:
        super().__init__(svc.store.redis, svc.store.ttl_s, svc.store.archive)
        self.svc, self.job_id, self.attempt = svc, job_id, attempt
        self.accepted = False

    def job_for_task(self, task_id: str) -> str | None:
        found = super().job_for_task(task_id)
        if found is None and not self.accepted:
            self.accepted = True
            assert record_acceptance(self.svc, self.job_id, self.attempt, task_id) == "accepted"
        return found


def test_the_workers_accept_landing_between_a_callbacks_reads_finishes_the_job(
    cb: Services, upstream: SandboxServer
) -> None:
    job_id, task_id, attempt = lost_answer_job(cb)
    racing = dataclasses.replace(cb, store=AcceptedMeanwhile(cb, job_id, attempt))

    assert call(racing, task_id, job_id) == 200

    done = record(cb, job_id)
    assert done.state is JobState.SUCCEEDED and done.upstream_task_id == task_id
    assert done.extra_task_ids == [] and not done.possibly_paid_twice
    assert record_infos(upstream) == 0


def test_a_task_arriving_after_a_resubmit_is_recorded_as_a_second_charge(
    cb: Services, upstream: SandboxServer
) -> None:
    job_id, first_task, attempt = lost_answer_job(cb)
    assert cb.store.end_attempt(job_id, attempt, unknown=True)
    # No callback within the wait: the job is sent again, and accepted.
    no_wait = make_services(
        upstream.url,
        kie_callback_url=CALLBACK_URL,
        kie_webhook_hmac_key=HMAC_KEY,
        remix_callback_wait_s=0.0,
    )
    assert submit_now(no_wait, job_id) == "accepted"
    second_task = record(cb, job_id).upstream_task_id
    assert second_task and second_task != first_task and record(cb, job_id).possibly_paid_twice
    assert call(cb, second_task) == 200
    done = record(cb, job_id)

    assert call(cb, first_task, job_id) == 200

    late = record(cb, job_id)
    assert late.extra_task_ids == [first_task] and late.possibly_paid_twice
    assert late.model_dump(exclude={"extra_task_ids"}) == done.model_dump(
        exclude={"extra_task_ids"}
    )
    assert cb.store.job_for_task(first_task) == job_id
    # Its next delivery is a known extra task: answered, and still nothing changes.
    assert call(cb, first_task, headers=headers_for(first_task, at=int(time.time()) + 1)) == 200
    assert record(cb, job_id) == late


def test_an_adoption_with_another_attempt_in_flight_flags_the_job(cb: Services) -> None:
    """A lost answer, the callback wait over, a second attempt sending: the first task
    calls back. Either attempt may have created a task, so the job may be paid twice."""
    job_id, first_task, attempt = lost_answer_job(cb)
    assert cb.store.end_attempt(job_id, attempt, unknown=True)
    second = cb.store.new_attempt_id()
    assert cb.store.begin_attempt(job_id, second, cb.settings.attempt_settle_s).status == "ok"

    assert call(cb, first_task, job_id) == 200

    done = record(cb, job_id)
    assert done.upstream_task_id == first_task and done.possibly_paid_twice
    assert record_acceptance(cb, job_id, second, "task-of-the-second-attempt") == "accepted"
    assert record(cb, job_id).extra_task_ids == ["task-of-the-second-attempt"]


# ----------------------------------------------------------------------------- waiting for it


def test_after_a_lost_answer_the_job_waits_for_a_callback_instead_of_sending_again(
    cb: Services, upstream: SandboxServer
) -> None:
    job_id, _, attempt = lost_answer_job(cb)
    assert cb.store.end_attempt(job_id, attempt, unknown=True)
    prompt = json.loads(cb.store.redis.hget(keys.job(job_id), "_request"))["prompt"]

    assert submit_now(cb, job_id) == "await_callback"

    assert sent(upstream, prompt) == 1
    due = cb.store.scheduled(job_id)
    assert due is not None and due >= cb.clock.now() + 110  # REMIX_CALLBACK_WAIT_S = 120
    assert record(cb, job_id).submit_attempts == 1


def test_with_callbacks_off_a_lost_answer_is_sent_again_at_once(
    svc: Services, upstream: SandboxServer
) -> None:
    assert svc.settings.callback_wait_s == 0
    job_id, _ = new_job(svc)
    attempt = svc.store.new_attempt_id()
    assert svc.store.begin_attempt(job_id, attempt, svc.settings.attempt_settle_s).status == "ok"
    assert svc.store.end_attempt(job_id, attempt, unknown=True)

    assert submit_now(svc, job_id) == "accepted"

    assert record(svc, job_id).possibly_paid_twice


def test_the_create_task_of_a_job_carries_its_callback_url(
    cb: Services, upstream: SandboxServer
) -> None:
    job_id, task_id = submitted_job(cb)

    info = cb.client().record_info(task_id)

    assert json.loads(info.param or "{}")["callBackUrl"] == f"{CALLBACK_URL}?job_id={job_id}"


def test_with_callbacks_on_every_poll_is_a_slow_safety_net(
    cb: Services, upstream: SandboxServer
) -> None:
    """Not only the first: later polls of a long generation wait REMIX_CALLBACK_POLL_S too."""
    upstream.configure(generation_seconds=120)
    job_id, _ = submitted_job(cb)
    due = cb.store.scheduled(job_id)
    assert due is not None and due >= cb.clock.now() + 29

    for _ in range(3):
        claimed = cb.store.update(job_id, due_in=0.0)
        assert claimed == 1
        dispatch = next(d for d in cb.store.claim_due(10, 30) if d.job_id == job_id)
        assert poll_step(cb, job_id, dispatch.token) == "pending"
        due = cb.store.scheduled(job_id)
        assert due is not None and due >= cb.clock.now() + 29


# ----------------------------------------------------------------------------- Redis away


def test_redis_down_answers_503_not_401(policy_redis: redis.Redis, upstream: SandboxServer) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    svc = make_services(
        upstream.url,
        redis_retry_s=0.2,
        redis_url=dead,
        result_backend_url=dead,
        kie_callback_url=CALLBACK_URL,
        kie_webhook_hmac_key=HMAC_KEY,
    )

    assert call(svc, "task_while_redis_is_down", "some-job") == 503


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port = free_port()
    server = start_redis(port, append_only_dir=tmp_path, log_path=tmp_path / "redis.log")
    yield port, tmp_path
    server.process.stop()


def test_redis_lost_mid_callback_answers_503_and_lets_the_retry_in(
    private_redis: tuple[int, Path], upstream: SandboxServer
) -> None:
    """Redis goes away while an adoption waits for recordInfo; the same delivery, tried
    again once Redis is back, is handled (not refused as a replay of itself)."""
    port, directory = private_redis
    url = f"redis://127.0.0.1:{port}/0"
    svc = make_services(
        upstream.url,
        redis_retry_s=0.2,
        redis_url=url,
        result_backend_url=url,
        kie_callback_url=CALLBACK_URL,
        kie_webhook_hmac_key=HMAC_KEY,
    )
    job_id, task_id, _ = lost_answer_job(svc)
    upstream.configure(slow_rate=1.0, slow_seconds=1.0, fault_endpoints=["recordInfo"])
    headers = headers_for(task_id)
    admin = redis.Redis.from_url(url)

    def outage() -> None:
        time.sleep(0.3)
        admin.shutdown()

    stopper = threading.Thread(target=outage)
    stopper.start()
    assert call(svc, task_id, job_id, headers=headers) == 503
    stopper.join(5)
    restarted = start_redis(port, append_only_dir=directory, log_path=directory / "redis2.log")
    try:
        upstream.configure(slow_rate=0.0)
        assert record(svc, job_id).upstream_task_id is None

        assert call(svc, task_id, job_id, headers=headers) == 200

        done = record(svc, job_id)
        assert done.state is JobState.SUCCEEDED and done.upstream_task_id == task_id
        assert call(svc, task_id, job_id, headers=headers) == 401  # now it is a replay
    finally:
        restarted.process.stop()


def test_an_upstream_error_while_confirming_answers_503(
    cb: Services, upstream: SandboxServer
) -> None:
    """recordInfo failing says nothing about the task: let the upstream try again."""
    job_id, task_id, _ = lost_answer_job(cb)
    upstream.configure(faults={500: 1.0}, fault_endpoints=["recordInfo"])
    headers = headers_for(task_id)

    assert call(cb, task_id, job_id, headers=headers) == 503
    assert record(cb, job_id).upstream_task_id is None

    upstream.configure(faults={})
    assert call(cb, task_id, job_id, headers=headers) == 200
    assert record(cb, job_id).state is JobState.SUCCEEDED


def test_verify_names_the_reason_for_metrics_only(cb: Services) -> None:
    with pytest.raises(CallbackRefused) as refusal:
        verify(cb, body_for("t"), headers_for("t", key="wrong"), time.time())
    assert refusal.value.reason == "bad_signature"


def test_the_receiver_and_the_sandbox_sign_like_kie_ai() -> None:
    """A vector from ``openssl dgst -sha256 -hmac KEY -binary | base64`` over
    ``taskId.timestamp``, as kie.ai documents its signature."""
    expected = "WBn7UMtiOE4a3JMK8coOOXz2VH3a56irjRsU6wQszuc="

    assert signature_for("kie-webhook-key", "task_ideogram_1", "1700000000") == expected
    assert webhook_signature("kie-webhook-key", "task_ideogram_1", 1700000000) == expected


def test_a_refusal_after_the_task_was_adopted_does_not_end_the_job(cb: Services) -> None:
    """The callback adopted the attempt's task while its worker still waited for the answer;
    whatever that answer says then, the job keeps its task."""
    job_id, _ = new_job(cb)
    status, job = cb.store.begin(job_id, 0, 30)
    assert status == "ok" and job is not None
    attempt = cb.store.new_attempt_id()
    assert cb.store.begin_attempt(job_id, attempt, cb.settings.attempt_settle_s).status == "ok"
    assert cb.store.accept(job_id, "", "task-adopted", 30) == "accepted"

    answer = ValidationFailedError("refused")
    assert submit_policy._after_error(cb, job, attempt, answer) == "adopted_meanwhile"

    done = record(cb, job_id)
    assert done.state is JobState.SUBMITTED and done.upstream_task_id == "task-adopted"
    assert done.fail_code is None and done.unknown_outcomes == 0


# ----------------------------------------------------------------------------- one delivery acts


class HeldStore(JobStore):
    """The job store, but the first callback to look its task up waits for ``go``."""

    def __init__(self, store: JobStore) -> None:
        super().__init__(store.redis, store.ttl_s, store.archive)
        self.inside = threading.Event()
        self.go = threading.Event()

    def job_for_task(self, task_id: str) -> str | None:
        if not self.inside.is_set():
            self.inside.set()
            assert self.go.wait(10)
        return super().job_for_task(task_id)


class FlakyStore(JobStore):
    """The job store, but its first look at a job's task fails as if Redis were away."""

    def __init__(self, store: JobStore) -> None:
        super().__init__(store.redis, store.ttl_s, store.archive)
        self.failed = False

    def task_of(self, job_id: str) -> tuple[bool, str | None]:
        if not self.failed:
            self.failed = True
            raise redis.ConnectionError("Redis went away (test)")
        return super().task_of(job_id)


def test_two_deliveries_of_one_signed_callback_at_once_are_acted_on_once(cb: Services) -> None:
    """The first delivery is held inside its handling; a second one with the same signature
    and another body comes meanwhile: it is refused, and only the first one's body counts."""
    job_id, task_id = submitted_job(cb)
    headers = headers_for(task_id)
    held = HeldStore(cb.store)
    first_svc = dataclasses.replace(cb, store=held)
    answers: dict[str, int] = {}
    first = threading.Thread(
        target=lambda: answers.update(first=call(first_svc, task_id, headers=headers))
    )
    first.start()
    try:
        assert held.inside.wait(10)
        answers["second"] = call(cb, task_id, body=body_for(task_id, "fail"), headers=headers)
    finally:
        held.go.set()
        first.join(10)

    assert answers == {"first": 200, "second": 401}
    done = record(cb, job_id)
    assert done.state is JobState.SUCCEEDED and done.result_urls == result_urls(task_id)
    assert cb.metrics.read().get("callbacks_total:valid") == 1
    assert refused(cb) == {"replay": 1}


def test_many_deliveries_of_one_signed_callback_at_once_are_acted_on_once(cb: Services) -> None:
    job_id, task_id = submitted_job(cb)
    headers = headers_for(task_id)
    bodies = [body_for(task_id, "success" if i % 2 else "fail") for i in range(12)]
    start = threading.Barrier(len(bodies))
    answers: list[int] = []

    def deliver(body: bytes) -> None:
        start.wait(10)
        answers.append(call(cb, task_id, body=body, headers=headers))

    racers = [threading.Thread(target=deliver, args=(body,)) for body in bodies]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(20)

    assert sorted(answers) == [200] + [401] * (len(bodies) - 1)
    assert record(cb, job_id).state in (JobState.SUCCEEDED, JobState.FAILED)
    assert cb.metrics.read().get("callbacks_total:valid") == 1
    assert refused(cb) == {"replay": len(bodies) - 1}


def test_a_delivery_answered_503_for_a_redis_error_is_acted_on_when_delivered_again(
    cb: Services,
) -> None:
    job_id, task_id = submitted_job(cb)
    headers = headers_for(task_id)
    flaky = dataclasses.replace(cb, store=FlakyStore(cb.store))

    assert call(flaky, task_id, headers=headers) == 503
    assert record(cb, job_id).state is JobState.SUBMITTED
    assert cb.store.redis.keys(keys.callback_seen("*")) == []  # given back

    assert call(flaky, task_id, headers=headers) == 200
    assert record(cb, job_id).state is JobState.SUCCEEDED
    assert call(flaky, task_id, headers=headers) == 401  # now it is a replay
    assert refused(cb) == {"replay": 1}


def test_a_refused_signed_callback_stays_remembered(cb: Services, upstream: SandboxServer) -> None:
    job_id, task_id, _ = lost_answer_job(cb)
    headers = headers_for(task_id)

    assert call(cb, task_id, headers=headers) == 401  # no job_id: an unknown task
    assert call(cb, task_id, job_id, headers=headers) == 401  # the same signature again

    assert refused(cb) == {"unknown_task": 1, "replay": 1}
    assert record(cb, job_id).upstream_task_id is None
    assert record_infos(upstream) == 0


# ----------------------------------------------------------------------------- result URLs


@pytest.mark.parametrize(
    "urls",
    [
        ["file:///etc/passwd"],
        ["gopher://results.example.test/x.png"],
        ["https://results.example.test/ok.png", "ftp://results.example.test/x.png"],
        ["//results.example.test/x.png"],
        ["https:///no-host.png"],
        ["https://results.example.test/a b.png"],
        ["https://results.example.test/x.png\r\nX-Injected: 1"],
        ["https://results.example.test/" + "x" * 10_000],
        [7],
        [None],
        [],
        "https://results.example.test/x.png",
    ],
)
def test_a_signed_success_whose_result_urls_are_not_http_urls_is_refused(
    cb: Services, urls: Any
) -> None:
    job_id, task_id = submitted_job(cb)
    result = json.dumps({"resultUrls": urls})
    body = {"data": {"taskId": task_id, "state": "success", "resultJson": result}}

    assert call(cb, task_id, body=json.dumps(body).encode()) == 401

    assert record(cb, job_id).state is JobState.SUBMITTED
    assert refused(cb) == {"bad_record": 1}


def test_a_signed_callback_without_a_state_is_refused(cb: Services) -> None:
    job_id, task_id = submitted_job(cb)
    body = json.dumps({"data": {"taskId": task_id}}).encode()

    assert call(cb, task_id, body=body) == 401

    assert record(cb, job_id).state is JobState.SUBMITTED
    assert refused(cb) == {"bad_record": 1}


# ----------------------------------------------------------------------------- confirmation


@pytest.fixture
def confirming(policy_redis: redis.Redis, upstream: SandboxServer) -> Services:
    """Callbacks on, with KIE_CALLBACK_CONFIRM: recordInfo decides, not the body."""
    return callback_services(upstream, kie_callback_confirm=True)


def instant_job(svc: Services) -> tuple[str, str]:
    """A job accepted upstream whose generation is over at once; ``(job_id, task_id)``."""
    job_id, _ = new_job(svc, prompt=f"confirm {uuid.uuid4().hex[:10]} {INSTANT}")
    assert submit_now(svc, job_id) == "accepted"
    task_id = record(svc, job_id).upstream_task_id
    assert task_id
    return job_id, task_id


def test_with_confirmation_a_forged_success_finishes_the_job_from_record_info(
    confirming: Services, upstream: SandboxServer
) -> None:
    job_id, task_id = instant_job(confirming)
    genuine = confirming.client().record_info(task_id)
    assert genuine.state == "success" and genuine.result_urls != result_urls(task_id)
    asked = record_infos(upstream)

    assert call(confirming, task_id) == 200  # its body names result_urls(task_id)

    done = record(confirming, job_id)
    assert done.state is JobState.SUCCEEDED and done.result_urls == genuine.result_urls
    assert record_infos(upstream) == asked + 1


def test_with_confirmation_a_forged_failure_does_not_fail_a_job_still_generating(
    confirming: Services, upstream: SandboxServer
) -> None:
    upstream.configure(generation_seconds=120)
    job_id, task_id = submitted_job(confirming)

    assert call(confirming, task_id, body=body_for(task_id, "fail")) == 200

    assert record(confirming, job_id).state is JobState.SUBMITTED
    assert record_infos(upstream) == 1


def test_with_confirmation_an_upstream_error_answers_503_and_the_delivery_comes_again(
    confirming: Services, upstream: SandboxServer
) -> None:
    job_id, task_id = instant_job(confirming)
    headers = headers_for(task_id)
    upstream.configure(faults={500: 1.0}, fault_endpoints=["recordInfo"])

    assert call(confirming, task_id, headers=headers) == 503
    assert record(confirming, job_id).state is JobState.SUBMITTED

    upstream.configure(faults={})
    assert call(confirming, task_id, headers=headers) == 200
    assert record(confirming, job_id).state is JobState.SUCCEEDED
    assert call(confirming, task_id, headers=headers) == 401


def test_with_confirmation_an_adoption_asks_record_info_once(
    confirming: Services, upstream: SandboxServer
) -> None:
    job_id, task_id, _ = lost_answer_job(confirming)

    assert call(confirming, task_id, job_id) == 200

    assert record(confirming, job_id).state is JobState.SUCCEEDED
    assert record_infos(upstream) == 1


# ----------------------------------------------------------------------------- unsigned noise


def test_unsigned_refusals_are_counted_in_the_process_and_write_nothing_to_redis(
    cb: Services,
) -> None:
    job_id, task_id = submitted_job(cb)
    forged = headers_for(task_id, key="not-the-key")
    noise = [
        (body_for(task_id), forged),
        (b"{not json", headers_for(task_id)),
        (body_for(task_id), headers_for(task_id, at=int(time.time()) - WINDOW_S - 5)),
        (body_for(task_id), {SIGNATURE_HEADER: "x"}),
    ] * 25
    before_keys = sorted(cb.store.redis.keys("*"))
    before_metrics = cb.metrics.read()
    before_writes = write_commands(cb.store.redis)
    before_local = process_refusals()

    answers = [respond(cb, body, headers, job_id).status_code for body, headers in noise]

    assert answers == [401] * len(noise)
    assert write_commands(cb.store.redis) == before_writes
    assert sorted(cb.store.redis.keys("*")) == before_keys
    assert cb.metrics.read() == before_metrics
    assert counted_since(before_local, process_refusals()) == {
        "bad_signature": 25,
        "malformed": 25,
        "stale": 25,
        "bad_timestamp": 25,
    }
    assert record(cb, job_id).state is JobState.SUBMITTED


def write_commands(client: redis.Redis) -> dict[str, int]:
    """How many times the server ran each command that writes (or may: scripts)."""
    stats = client.info("commandstats")
    writes = ("hincrby", "hset", "set", "incr", "incrby", "evalsha", "eval", "expire", "del")
    return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in writes}


def process_refusals() -> dict[str, int]:
    prefix = "callbacks_refused_total:"
    return {k[len(prefix) :]: v for k, v in PROCESS_COUNTERS.read().items() if k.startswith(prefix)}


def counted_since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
