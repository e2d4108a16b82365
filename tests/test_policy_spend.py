"""The spend cap step by step: real Redis, the sandbox over HTTP, no worker.

Each test drives :func:`worker.policies.submit.submit_step` with ``REMIX_SPEND_CAP`` set and
checks the spend log, the record and the schedule, and what the sandbox accepted.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from sandbox.server import SandboxServer
from tests.policy_kit import accepted, give_moment, make_services, new_job, sent, submit_now
from worker import keys
from worker.models import JobState
from worker.policies.submit import submit_step
from worker.services import Services
from worker.store.jobs import RETRIES_FIELD, SPEND_FIELD

pytestmark = pytest.mark.policy


def capped(upstream: SandboxServer, cap: str, **overrides: Any) -> Services:
    return make_services(upstream.url, remix_spend_cap=cap, **overrides)


def spend_log(svc: Services) -> int:
    return int(svc.broker.zcard(keys.spend_log(svc.api_key_id)))


def step(svc: Services, job_id: str) -> str:
    return submit_now(svc, job_id)


def due_in(svc: Services, job_id: str) -> float:
    due = svc.store.scheduled(job_id)
    assert due is not None
    return due - svc.clock.now()


def assert_waits_queued(svc: Services, job_id: str) -> None:
    """Held by the cap: still queued, no retry spent, nothing sent."""
    record = svc.store.get(job_id)
    assert record is not None and record.state is JobState.QUEUED
    assert record.submit_attempts == 0
    assert not svc.store.get_internal(job_id, RETRIES_FIELD)


def in_line(svc: Services, job_id: str) -> bool:
    return svc.store.get_internal(job_id, "_line") is not None


def test_a_job_beyond_the_cap_waits_queued_in_its_line(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    """While the cap is reached, no send moment is granted: the job keeps its place and
    holds no spend reservation."""
    svc = capped(upstream, "2/30s")
    (a, _), (b, _), (c, prompt) = new_job(svc), new_job(svc), new_job(svc)

    assert [step(svc, a), step(svc, b), step(svc, c)] == ["accepted", "accepted", "line"]

    assert_waits_queued(svc, c)
    assert in_line(svc, c) and give_moment(svc) == []
    assert sent(upstream, prompt) == 0
    assert svc.store.get_internal(c, SPEND_FIELD) is None
    assert spend_log(svc) == 2
    assert svc.metrics.read()["spend_reservations_total"] == 2


def granted_despite_the_cap(svc: Services) -> list[str]:
    """A moment granted just before another worker's send filled the cap (a race)."""
    grants = svc.limiter.grant(svc.lines.waiting([svc.provider])[svc.provider], 1)
    picked = svc.lines.pick(svc.provider, grants.members, {}, svc.settings.lease_s)
    return [d.job_id for d in picked]


def test_a_job_that_meets_a_full_cap_with_a_moment_goes_back_to_its_line(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    """The cap filled between the grant and the send: the job goes back to its place,
    reserving nothing, and goes once the cap has room."""
    svc = capped(upstream, "1/1.5s")
    (a, _), (b, prompt) = new_job(svc), new_job(svc)
    assert step(svc, a) == "accepted"
    assert granted_despite_the_cap(svc) == [b]

    assert step(svc, b) == "spend"
    assert in_line(svc, b) and svc.store.get_internal(b, SPEND_FIELD) is None
    assert spend_log(svc) == 1
    assert_waits_queued(svc, b)
    assert give_moment(svc) == []

    time.sleep(1.8)  # the window, widened for late sends
    assert step(svc, b) == "accepted"
    assert accepted(upstream, prompt) == 1
    assert spend_log(svc) == 1  # a's spend has left the window; b's counts
    assert svc.store.get_internal(b, SPEND_FIELD) is None  # used by its attempt


def test_a_definite_refusal_gives_its_reservation_back(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = capped(upstream, "1/60s")
    upstream.configure(faults={500: 1.0}, fault_style="body", fault_endpoints=["createTask"])
    job_id, prompt = new_job(svc)

    assert step(svc, job_id) == "retry"
    assert spend_log(svc) == 0
    assert svc.metrics.read()["spend_refunds_total"] == 1

    upstream.configure(faults={})
    assert step(svc, job_id) == "accepted"  # the cap's one createTask is still there
    assert accepted(upstream, prompt) == 1
    assert spend_log(svc) == 1


def test_an_attempt_of_unknown_outcome_counts_as_spent(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = capped(upstream, "1/60s")
    upstream.configure(cut_rate=1.0, fault_endpoints=["createTask"])
    (a, _), (b, prompt) = new_job(svc), new_job(svc)

    assert step(svc, a) == "retry"
    assert svc.store.get(a).unknown_outcomes == 1  # type: ignore[union-attr]
    assert spend_log(svc) == 1
    assert "spend_refunds_total" not in svc.metrics.read()

    upstream.configure(cut_rate=0.0)
    assert step(svc, b) == "line"
    assert give_moment(svc) == []
    assert sent(upstream, prompt) == 0
    assert_waits_queued(svc, b)


def test_every_window_of_the_cap_holds(policy_redis: redis.Redis, upstream: SandboxServer) -> None:
    svc = capped(upstream, "1/1s,2/60s")
    (a, _), (b, _), (c, _) = new_job(svc), new_job(svc), new_job(svc)
    assert step(svc, a) == "accepted"

    assert step(svc, b) == "line"  # the short window
    assert give_moment(svc) == []
    time.sleep(1.3)  # the window, widened for late sends
    assert step(svc, b) == "accepted"

    assert step(svc, c) == "line"  # the long window: a minute after the first
    time.sleep(1.3)
    assert give_moment(svc) == []
    assert [u.spent for u in svc.spend.usage()] == [0, 2]


def test_a_cap_further_than_the_horizon_holds_without_a_reservation(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    """10,000 jobs behind a daily cap: each waits in its line and reserves nothing."""
    svc = capped(upstream, "1/1d")
    (a, _), (b, _) = new_job(svc), new_job(svc)
    assert step(svc, a) == "accepted"

    assert step(svc, b) == "line"
    assert svc.store.get_internal(b, SPEND_FIELD) is None
    assert spend_log(svc) == 1
    # Handed out by the schedule only at its submit deadline, a day away.
    assert 86400 - 5 < due_in(svc, b) <= 86400 + 1.5
    assert_waits_queued(svc, b)


def test_a_job_held_past_its_submit_deadline_fails_from_its_line(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = capped(upstream, "1/60s", remix_submit_deadline_s=1.0)
    (a, _), (b, _) = new_job(svc), new_job(svc)
    assert step(svc, a) == "accepted"
    assert step(svc, b) == "line"
    assert due_in(svc, b) <= 2.1  # the backstop: its deadline, not the minute the cap asks

    time.sleep(max(0.0, due_in(svc, b)))
    (claimed,) = [d for d in svc.store.claim_due(10, 30) if d.job_id == b]
    assert submit_step(svc, b, claimed.token) == "failed"
    record = svc.store.get(b)
    assert record is not None and record.fail_code == "submit_timeout"
    assert not in_line(svc, b) and svc.lines.waiting([svc.provider])[svc.provider] == 0
    assert spend_log(svc) == 1


def test_without_a_cap_nothing_is_reserved(svc: Services, upstream: SandboxServer) -> None:
    job_id, _ = new_job(svc)
    assert step(svc, job_id) == "accepted"
    assert spend_log(svc) == 0
    assert svc.spend.usage() == []
