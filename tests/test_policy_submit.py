"""The submit policy step by step: real Redis, the sandbox over HTTP, no worker.

Each test drives :func:`worker.policies.submit.submit_step` (or the store's attempt scripts)
and checks the record, the schedule and what the sandbox received and accepted.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis

from sandbox.server import SandboxServer
from tests.policy_kit import (
    accepted,
    give_moment,
    make_services,
    new_job,
    sent,
    submit_now,
    token_of,
)
from worker.models import JobState
from worker.policies.submit import submit_step
from worker.services import Services

pytestmark = pytest.mark.policy


def test_one_step_sends_once_and_schedules_the_first_poll(
    svc: Services, upstream: SandboxServer
) -> None:
    job_id, prompt = new_job(svc)

    assert submit_now(svc, job_id) == "accepted"

    record = svc.store.get(job_id)
    assert record is not None and record.state is JobState.SUBMITTED
    assert record.upstream_task_id and record.submit_attempts == 1
    assert record.attempt_started_at is None and record.unknown_outcomes == 0
    due = svc.store.scheduled(job_id)
    assert due is not None and due <= svc.clock.now() + svc.settings.remix_poll_initial_s + 0.1
    assert (sent(upstream, prompt), accepted(upstream, prompt)) == (1, 1)


def test_a_stale_message_does_nothing(svc: Services, upstream: SandboxServer) -> None:
    job_id, prompt = new_job(svc)
    assert give_moment(svc) == [job_id]  # the job was handed out: token 1

    assert submit_step(svc, job_id, 0) == "stale"
    assert sent(upstream, prompt) == 0
    assert submit_now(svc, job_id) == "accepted"


def test_two_copies_of_one_message_in_flight_send_once(
    svc: Services, upstream: SandboxServer
) -> None:
    """A redelivered message and its original run at once; the attempt lets one through
    (the copy that finds the moment used goes back to the line, or meets the attempt; a
    copy that read the job's token before the other's send moment replaced it is stale)."""
    upstream.configure(slow_rate=1.0, slow_seconds=0.5, fault_endpoints=["createTask"])
    job_id, prompt = new_job(svc)
    results: list[str] = []
    copies = [threading.Thread(target=lambda: results.append(submit_now(svc, job_id)))]
    copies.append(threading.Thread(target=lambda: results.append(submit_now(svc, job_id))))
    for copy in copies:
        copy.start()
    for copy in copies:
        copy.join(10)

    assert sorted(results)[0] == "accepted"
    assert sorted(results)[1] in ("attempt_open", "budget", "line", "stale")
    assert (sent(upstream, prompt), accepted(upstream, prompt)) == (1, 1)
    assert svc.store.get(job_id).submit_attempts == 1  # type: ignore[union-attr]


def test_an_attempt_is_checked_under_the_attempt_itself(svc: Services) -> None:
    """Copy A runs completely between copy B's read and B's attempt: B must not send."""
    job_id, _ = new_job(svc)
    status, job_b = svc.store.begin(job_id, 0, 30)
    assert status == "ok" and job_b is not None and not job_b.record.upstream_task_id
    first = svc.store.new_attempt_id()
    assert svc.store.begin_attempt(job_id, first, 60).status == "ok"
    assert svc.store.accept(job_id, first, "task-A", 5) == "accepted"

    assert svc.store.begin_attempt(job_id, svc.store.new_attempt_id(), 60).status == "accepted"


def test_only_the_owner_closes_an_attempt(svc: Services) -> None:
    job_id, _ = new_job(svc)
    mine = svc.store.new_attempt_id()
    assert svc.store.begin_attempt(job_id, mine, 60).status == "ok"

    assert not svc.store.end_attempt(job_id, "someone-else", unknown=False)
    assert svc.store.begin_attempt(job_id, "another", 60).status == "open"
    assert svc.store.end_attempt(job_id, mine, unknown=False)
    assert svc.store.begin_attempt(job_id, "another", 60).status == "ok"


def test_an_attempt_that_never_recorded_its_outcome_is_counted_and_flags_a_resend(
    svc: Services, upstream: SandboxServer
) -> None:
    """A worker died mid-createTask: once the attempt has settled, a resend may go, flagged."""
    job_id, prompt = new_job(svc)
    assert svc.store.begin_attempt(job_id, "dead-worker", 60).status == "ok"

    assert submit_now(svc, job_id) == "attempt_open"
    assert sent(upstream, prompt) == 0
    svc.store.redis.hset(f"remixq:job:{job_id}", "attempt_started_at", "1")  # long ago
    svc.store.update(job_id, token=token_of(svc, job_id), due_in=0)

    assert submit_now(svc, job_id) == "accepted"
    record = svc.store.get(job_id)
    assert record is not None
    assert record.unknown_outcomes == 1 and record.possibly_paid_twice
    assert svc.metrics.read()["unknown_outcomes_total"] == 1
    assert svc.metrics.read()["possibly_paid_twice_total"] == 1


def test_a_cut_answer_is_an_unknown_outcome_and_the_resend_is_flagged(
    svc: Services, upstream: SandboxServer
) -> None:
    upstream.configure(cut_rate=1.0, fault_endpoints=["createTask"])
    job_id, prompt = new_job(svc)

    assert submit_now(svc, job_id) == "retry"
    record = svc.store.get(job_id)
    assert record is not None and record.state is JobState.QUEUED
    assert record.unknown_outcomes == 1 and record.attempt_started_at is None
    assert upstream.stats()["ambiguous_by_prompt"] == {prompt: 1}

    upstream.configure(cut_rate=0.0)
    assert submit_now(svc, job_id) == "accepted"
    record = svc.store.get(job_id)
    assert record is not None and record.possibly_paid_twice
    assert accepted(upstream, prompt) == 2  # the upstream did charge twice, and we say so


def test_accept_then_drop_is_an_unknown_outcome(svc: Services, upstream: SandboxServer) -> None:
    upstream.configure(drop_rate=1.0)
    job_id, prompt = new_job(svc)
    assert submit_now(svc, job_id) == "retry"
    assert svc.store.get(job_id).unknown_outcomes == 1  # type: ignore[union-attr]
    assert upstream.stats()["ambiguous_by_prompt"] == {prompt: 1}


def test_a_connection_refused_is_not_an_unknown_outcome(policy_redis: redis.Redis) -> None:
    svc = make_services("http://127.0.0.1:9")  # nothing listens on the discard port
    job_id, _ = new_job(svc)
    assert submit_now(svc, job_id) == "retry"
    record = svc.store.get(job_id)
    assert record is not None and record.unknown_outcomes == 0 and record.submit_attempts == 1


def test_a_trickling_answer_ends_at_the_request_deadline(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    """One byte a second never trips a read timeout; the total deadline cuts it."""
    svc = make_services(upstream.url, kie_request_deadline_s=1.5, kie_read_timeout_s=5)
    upstream.configure(trickle_rate=1.0, trickle_seconds=0.5, fault_endpoints=["createTask"])
    job_id, _ = new_job(svc)
    started = time.monotonic()

    assert submit_now(svc, job_id) == "retry"

    assert time.monotonic() - started < 1.5 + 1.0
    record = svc.store.get(job_id)
    assert record is not None and record.unknown_outcomes == 1
    assert svc.settings.kie_request_deadline_s < svc.settings.lease_s


@pytest.mark.parametrize("code", [404, 422, 501, 505])
def test_a_permanent_code_fails_after_one_request(
    svc: Services, upstream: SandboxServer, code: int
) -> None:
    job_id, prompt = new_job(svc, f"[sandbox:create={code}] permanent")
    assert submit_now(svc, job_id) == "failed"
    record = svc.store.get(job_id)
    assert record is not None and record.fail_code == str(code)
    assert svc.store.scheduled(job_id) is None
    assert sent(upstream, prompt) == 1


@pytest.mark.parametrize(
    ("code", "style", "expected"),
    [
        (401, "page", "failed"),
        (402, "page", "held"),
        (455, "page", "held"),
        (429, "page", "retry"),
        (500, "page", "retry"),
    ],
)
def test_a_non_json_answer_acts_by_its_http_status(
    svc: Services, upstream: SandboxServer, code: int, style: str, expected: str
) -> None:
    upstream.configure(fault_style=style)
    job_id, _ = new_job(svc, f"[sandbox:create={code}] page")
    assert submit_now(svc, job_id) == expected
    record = svc.store.get(job_id)
    assert record is not None
    if expected == "held":  # a whole-key answer spends no retry
        assert not svc.store.get_internal(job_id, "_retries")
    if code == 402:
        state = svc.pause.state()
        assert state is not None and state.reason == "402"


def test_a_stray_455_defers_its_job_and_three_in_a_row_pause_the_key(
    svc: Services, upstream: SandboxServer
) -> None:
    first, _ = new_job(svc, "[sandbox:create=455] stray")
    assert submit_now(svc, first) == "held"
    assert svc.pause.state() is None
    assert not svc.store.get_internal(first, "_retries")

    for _ in range(2):
        job_id, _ = new_job(svc, "[sandbox:create=455] again")
        submit_now(svc, job_id)

    state = svc.pause.state()
    assert state is not None and state.reason == "455"


def test_a_huge_retry_after_is_capped_and_resume_clears_it(
    svc: Services, upstream: SandboxServer
) -> None:
    from worker.limits.ratelimit import MAX_BLOCK_S

    upstream.configure(faults={429: 1.0}, retry_after="86400", fault_endpoints=["createTask"])
    job_id, _ = new_job(svc)
    assert submit_now(svc, job_id) == "retry"
    blocked_for = svc.limiter.usage().blocked_for
    assert 0 < blocked_for <= MAX_BLOCK_S

    assert svc.limiter.clear_block()
    assert svc.limiter.usage().blocked_for == 0


def test_infinite_retry_after_does_not_crash_the_step(
    svc: Services, upstream: SandboxServer
) -> None:
    upstream.configure(faults={429: 1.0}, retry_after="inf", fault_endpoints=["createTask"])
    job_id, _ = new_job(svc)
    assert submit_now(svc, job_id) == "retry"


def test_a_probe_does_not_erase_an_operator_pause_set_meanwhile(svc: Services) -> None:
    assert svc.pause.trip("455", "maintenance")
    probed = svc.pause.state()
    assert probed is not None
    svc.pause.pause_by_operator("billing check")

    assert not svc.pause.end(probed)
    state = svc.pause.state()
    assert state is not None and state.by_operator


def test_a_job_held_by_a_pause_is_woken_when_the_pause_ends(
    svc: Services, upstream: SandboxServer
) -> None:
    svc.pause.pause_by_operator("hold")
    job_id, prompt = new_job(svc)
    assert submit_now(svc, job_id) == "pause"
    due = svc.store.scheduled(job_id)
    assert due is not None and due > svc.clock.now() + 30

    svc.pause.resume()
    assert svc.store.release_held(svc.api_key_id, 0.0, 600.0) == 1
    assert svc.store.get_internal(job_id, "_line") is not None  # back in its line
    assert sent(upstream, prompt) == 0
    assert give_moment(svc) == [job_id]


def test_past_the_submit_deadline_an_open_attempt_is_waited_for(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = make_services(upstream.url, remix_submit_deadline_s=1.0)
    job_id, prompt = new_job(svc)
    assert svc.store.begin_attempt(job_id, "in-flight", 60).status == "ok"
    time.sleep(1.2)  # the job's submit deadline passes while the attempt is open

    assert submit_now(svc, job_id) == "attempt_open"
    assert svc.store.get(job_id).state is JobState.QUEUED  # type: ignore[union-attr]
    assert svc.store.accept(job_id, "in-flight", "task-late", 1) == "accepted"
    assert sent(upstream, prompt) == 0


def test_invalid_request_from_a_foreign_producer_fails_without_a_request(
    svc: Services, upstream: SandboxServer
) -> None:
    job_id, prompt = new_job(svc, strength=0.35)
    assert submit_now(svc, job_id) == "failed"
    record = svc.store.get(job_id)
    assert record is not None and record.fail_code == "invalid_request"
    assert sent(upstream, prompt) == 0


def test_resume_releases_jobs_parked_for_a_long_retry_after(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    """A 429 with Retry-After 300 holds the key; an operator's resume means: go now."""
    from worker.policies.gates import resume_key

    svc = make_services(upstream.url, kie_rate_limit="2/1s")
    upstream.configure(faults={429: 1.0}, retry_after="300", fault_endpoints=["createTask"])
    job_id, _ = new_job(svc)
    assert submit_now(svc, job_id) == "retry"
    upstream.configure(faults={})
    svc.store.update(job_id, token=token_of(svc, job_id), due_in=0)
    assert submit_now(svc, job_id) == "line"  # the key is held: no moment is granted
    assert give_moment(svc) == []

    assert resume_key(svc.store, svc.pause, svc.limiter, svc.api_key_id, 600.0)

    assert submit_now(svc, job_id) == "accepted"


def test_a_job_refused_402_while_the_key_has_credits_waits_alone(
    svc: Services, upstream: SandboxServer
) -> None:
    """One job costs more than the balance: it must not pause the fleet again and again."""
    job_id, _ = new_job(svc, "[sandbox:create=402] too expensive")
    assert submit_now(svc, job_id) == "held"
    assert svc.pause.state() is not None  # the first 402 pauses the key: it may be empty
    time.sleep(svc.settings.remix_pause_probe_s + 0.1)
    svc.store.update(job_id, token=0, due_in=0)

    # The probe finds credits and the pause ends; the job is refused again.
    assert submit_now(svc, job_id) == "held_alone"

    record = svc.store.get(job_id)
    assert record is not None and record.state is JobState.QUEUED  # waits; not failed
    assert svc.pause.state() is None and svc.metrics.read().get("pauses_total:402") == 1
    due = svc.store.scheduled(job_id)  # backs off like a probe, from REMIX_PAUSE_PROBE_S
    assert due is not None and due >= svc.clock.now() + 0.9 * svc.settings.remix_pause_probe_s


def test_a_job_refused_402_again_when_credits_ran_out_again_pauses_the_key(
    svc: Services, upstream: SandboxServer
) -> None:
    """A top-up too small: the key is empty again, so the job waits with the fleet."""
    upstream.configure(credits=0)
    first, _ = new_job(svc)
    assert submit_now(svc, first) == "held"
    upstream.configure(credits=1)  # the operator tops up one credit
    time.sleep(svc.settings.remix_pause_probe_s + 0.1)
    other, _ = new_job(svc)
    assert submit_now(svc, other) == "accepted"  # the probe ends the pause; it spends it
    svc.store.update(first, token=0, due_in=0)

    assert submit_now(svc, first) == "held"  # refused again: the key is empty again

    record = svc.store.get(first)
    assert record is not None and record.state is JobState.QUEUED
    state = svc.pause.state()
    assert state is not None and state.reason == "402"


def test_a_gateway_timeout_page_after_acceptance_is_an_unknown_outcome(
    svc: Services, upstream: SandboxServer
) -> None:
    """A proxy answers 504 after passing createTask on: the upstream may have charged."""
    upstream.configure(gateway_rate=1.0)
    job_id, prompt = new_job(svc)
    assert submit_now(svc, job_id) == "retry"
    assert svc.store.get(job_id).unknown_outcomes == 1  # type: ignore[union-attr]

    upstream.configure(gateway_rate=0.0)
    assert submit_now(svc, job_id) == "accepted"
    record = svc.store.get(job_id)
    assert record is not None and record.possibly_paid_twice
    assert accepted(upstream, prompt) == 2 and upstream.stats()["ambiguous"] == 1


def test_a_json_server_error_from_the_upstream_itself_is_not_an_unknown_outcome(
    svc: Services, upstream: SandboxServer
) -> None:
    upstream.configure(faults={500: 1.0}, fault_style="body", fault_endpoints=["createTask"])
    job_id, _ = new_job(svc)
    assert submit_now(svc, job_id) == "retry"
    assert svc.store.get(job_id).unknown_outcomes == 0  # type: ignore[union-attr]


def test_a_job_held_for_its_key_is_left_to_its_waiting_message_when_released(
    svc: Services,
) -> None:
    """Resume must not send a second message for a held job whose message is queued."""
    job_id, _ = new_job(svc)
    svc.store.hold(svc.api_key_id, job_id)
    assert give_moment(svc) == [job_id]  # its moment came: a message is on its way

    assert svc.store.release_held(svc.api_key_id, 0.0, 600.0) == 0
    assert svc.store.get_internal(job_id, "_line") is None
    assert svc.store.claim_due(10, 30) == []
    assert submit_step(svc, job_id, token_of(svc, job_id)) == "accepted"


def test_a_credit_balance_that_is_not_a_finite_number_is_a_bad_answer() -> None:
    from worker.upstreams.errors import BadAnswerError
    from worker.upstreams.kie import parse_credit

    for value in (float("nan"), float("inf"), "100", True, None):
        with pytest.raises(BadAnswerError):
            parse_credit(value)
    assert parse_credit(42.0) == 42
