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
from tests.policy_kit import accepted, make_services, new_job, sent, token_of
from worker import keys
from worker.models import JobState
from worker.policies.gates import RESERVE_AHEAD_S
from worker.policies.submit import submit_step
from worker.services import Services
from worker.store.jobs import RETRIES_FIELD, SPEND_FIELD

pytestmark = pytest.mark.policy


def capped(upstream: SandboxServer, cap: str, **overrides: Any) -> Services:
    return make_services(upstream.url, remix_spend_cap=cap, **overrides)


def spend_log(svc: Services) -> int:
    return int(svc.broker.zcard(keys.spend_log(svc.api_key_id)))


def step(svc: Services, job_id: str) -> str:
    return submit_step(svc, job_id, token_of(svc, job_id))


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


def test_a_job_beyond_the_cap_waits_queued_with_its_own_reservation(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = capped(upstream, "2/30s")
    (a, _), (b, _), (c, prompt) = new_job(svc), new_job(svc), new_job(svc)

    assert [step(svc, a), step(svc, b), step(svc, c)] == ["accepted", "accepted", "spend"]

    assert_waits_queued(svc, c)
    assert sent(upstream, prompt) == 0
    assert 29 < due_in(svc, c) <= 30.5  # its reserved moment, a window after the first
    held = svc.store.get_internal(c, SPEND_FIELD)
    assert held is not None and held["at"] > svc.clock.now()
    assert spend_log(svc) == 3  # two spent, one reserved ahead
    metrics = svc.metrics.read()
    assert metrics["spend_cap_waits_total"] == 1
    assert metrics["spend_reservations_total"] == 3


def test_a_waiting_job_woken_early_keeps_its_one_reservation(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    """A redelivered or early message must not reserve a second moment."""
    svc = capped(upstream, "1/1.5s")
    (a, _), (b, prompt) = new_job(svc), new_job(svc)
    assert step(svc, a) == "accepted"
    assert step(svc, b) == "spend"
    held = svc.store.get_internal(b, SPEND_FIELD)

    assert step(svc, b) == "spend"  # woken at once
    assert svc.store.get_internal(b, SPEND_FIELD) == held
    assert spend_log(svc) == 2

    time.sleep(max(0.0, due_in(svc, b)))
    assert step(svc, b) == "accepted"
    assert accepted(upstream, prompt) == 1
    assert spend_log(svc) == 2  # the reservation was used, not another one made
    assert svc.store.get_internal(b, SPEND_FIELD) is None


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
    assert step(svc, b) == "spend"
    assert sent(upstream, prompt) == 0
    assert_waits_queued(svc, b)


def test_every_window_of_the_cap_holds(policy_redis: redis.Redis, upstream: SandboxServer) -> None:
    svc = capped(upstream, "1/1s,2/60s")
    (a, _), (b, _), (c, _) = new_job(svc), new_job(svc), new_job(svc)
    assert step(svc, a) == "accepted"

    assert step(svc, b) == "spend"  # the short window
    assert 0.5 < due_in(svc, b) <= 1.3
    time.sleep(max(0.0, due_in(svc, b)))
    assert step(svc, b) == "accepted"

    assert step(svc, c) == "spend"  # the long window: a minute after the first
    assert 57 < due_in(svc, c) <= 60.5
    assert [u.spent for u in svc.spend.usage()] == [1, 2]
    assert svc.spend.usage()[0].reserved_ahead == 1


def test_a_cap_further_than_the_horizon_holds_without_a_reservation(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    """10,000 jobs behind a daily cap: each is one schedule member and reserves nothing."""
    svc = capped(upstream, "1/1d")
    (a, _), (b, _) = new_job(svc), new_job(svc)
    assert step(svc, a) == "accepted"

    assert step(svc, b) == "spend"
    assert svc.store.get_internal(b, SPEND_FIELD) is None
    assert spend_log(svc) == 1
    # Woken once a moment is within reach (or at its submit deadline, a day away too).
    assert 86400 - RESERVE_AHEAD_S - 5 < due_in(svc, b) <= 86400 + 1.5
    assert_waits_queued(svc, b)


def test_a_job_held_past_its_submit_deadline_fails_and_gives_back_its_reservation(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = capped(upstream, "1/60s", remix_submit_deadline_s=1.0)
    (a, _), (b, _) = new_job(svc), new_job(svc)
    assert step(svc, a) == "accepted"
    assert step(svc, b) == "spend"
    assert due_in(svc, b) <= 2.1  # not the minute the cap asks: the deadline comes first
    assert spend_log(svc) == 2

    time.sleep(max(0.0, due_in(svc, b)))
    assert step(svc, b) == "failed"
    record = svc.store.get(b)
    assert record is not None and record.fail_code == "submit_timeout"
    assert spend_log(svc) == 1


def test_without_a_cap_nothing_is_reserved(svc: Services, upstream: SandboxServer) -> None:
    job_id, _ = new_job(svc)
    assert step(svc, job_id) == "accepted"
    assert spend_log(svc) == 0
    assert svc.spend.usage() == []
