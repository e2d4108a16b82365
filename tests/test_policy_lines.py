"""The waiting lines and the picker, against a real Redis and the sandbox (no worker).

Who gets the key's send moments: strictly by priority, by weight between tenants inside
a priority, first in first out inside a tenant's line; nothing lost or taken twice.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
import redis

from sandbox.server import SandboxServer
from tests.policy_kit import (
    enqueue_lined,
    give_moment,
    make_services,
    pick_next,
    submit_now,
    tenant_of,
    token_of,
)
from worker import keys
from worker.limits import ratelimit
from worker.policies.submit import submit_step
from worker.services import Services

pytestmark = pytest.mark.policy


def lined(upstream: SandboxServer, **overrides: Any) -> Services:
    """Services whose budget is large enough that a test's picks are never held by it."""
    return make_services(upstream.url, kie_rate_limit="1000/1s", **overrides)


def test_priorities_are_strict_and_each_line_is_first_in_first_out(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = lined(upstream)
    bulk = enqueue_lined(svc, "a", "bulk", 3)
    normal = enqueue_lined(svc, "a", "normal", 2)
    interactive = enqueue_lined(svc, "b", "interactive", 2)

    assert pick_next(svc, 7) == interactive + normal + bulk
    assert svc.lines.waiting(["kie"]) == {"kie": 0}


def test_equal_tenants_take_turns_and_weights_share_the_moments(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = lined(upstream, remix_tenant_weights="heavy=3")
    enqueue_lined(svc, "heavy", n=40)
    enqueue_lined(svc, "light", n=40)
    first = Counter(tenant_of(svc, j) for j in pick_next(svc, 20))
    assert first == {"heavy": 15, "light": 5}

    enqueue_lined(svc, "x", n=10)
    enqueue_lined(svc, "y", n=10)
    even = lined(upstream)  # another worker's settings: every tenant weighs 1 there
    turns = Counter(tenant_of(svc, j) for j in pick_next(even, 16))
    assert turns == {"heavy": 4, "light": 4, "x": 4, "y": 4}


def test_a_tenant_that_comes_back_after_idling_earns_no_credit(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = lined(upstream)
    enqueue_lined(svc, "steady", n=30)
    assert len(pick_next(svc, 10)) == 10  # steady alone: its pass runs ahead
    enqueue_lined(svc, "newcomer", n=10)

    turns = [tenant_of(svc, j) for j in pick_next(svc, 10)]
    # Turns from the class's virtual time (the newcomer may go first), not ten in a row.
    assert turns.count("newcomer") in (5, 6)
    newcomer_runs = "".join("n" if t == "newcomer" else " " for t in turns).split()
    assert max(map(len, newcomer_runs)) <= 2


def test_cancelled_jobs_leave_their_line_and_take_no_moment(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    """A tenant whose jobs are all cancelled while it holds the next pick."""
    svc = lined(upstream)
    gone = enqueue_lined(svc, "a", n=3)
    kept = enqueue_lined(svc, "b", n=2)
    for job_id in gone:
        assert svc.store.cancel(job_id) == "cancelled"
    assert svc.lines.waiting(["kie"]) == {"kie": 2}

    grants = svc.limiter.grant(3, 3)
    picked = svc.lines.pick("kie", grants.members, {}, 30.0)
    assert [d.job_id for d in picked] == kept
    assert svc.store.redis.zcard(keys.line_tenants("kie", "normal")) == 0


def test_a_burst_arriving_while_another_tenant_is_sent_shares_from_then_on(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = lined(upstream)
    (first,) = enqueue_lined(svc, "a")
    assert give_moment(svc) == [first]
    enqueue_lined(svc, "b", n=6)  # b's burst arrives while a's job is being sent
    enqueue_lined(svc, "a", n=6)
    assert submit_step(svc, first, token_of(svc, first)) == "accepted"

    turns = [tenant_of(svc, j) for j in pick_next(svc, 6)]
    assert Counter(turns) == {"a": 3, "b": 3}


def test_a_job_whose_moment_was_lost_goes_back_to_its_place(
    policy_redis: redis.Redis, upstream: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Picked, then its worker died before sending: after its lease the schedule hands it
    out again, its moment is void, and it is the next of its line, not the last."""
    monkeypatch.setattr(ratelimit, "GRANT_VALID_S", 0.2)
    svc = lined(upstream)
    head, *rest = enqueue_lined(svc, "a", n=4)
    assert pick_next(svc, 1) == [head]
    svc.store.update(head, due_in=0)  # its lease ran out
    (again,) = [d for d in svc.store.claim_due(10, 30) if d.job_id == head]
    time.sleep(0.3)  # the grant expired meanwhile
    assert submit_step(svc, head, again.token) == "budget"  # its moment is void: back in line
    assert pick_next(svc, 2) == [head, rest[0]]


def test_a_held_job_released_goes_back_in_priority_order(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    """A paused key with mixed classes waiting: all resume in priority order."""
    svc = lined(upstream)
    svc.pause.pause_by_operator("maintenance")
    bulk = enqueue_lined(svc, "a", "bulk", 2)
    interactive = enqueue_lined(svc, "b", "interactive", 2)
    for job_id in bulk + interactive:
        assert submit_now(svc, job_id) == "pause"
    assert svc.lines.waiting(["kie"]) == {"kie": 4}  # they keep their places
    assert give_moment(svc) == []  # no moment while paused

    from worker.policies.gates import resume_key

    assert resume_key(svc.store, svc.pause, svc.limiter, svc.api_key_id, 600.0)
    assert pick_next(svc, 4) == interactive + bulk


def test_the_fleet_view_and_metrics_show_each_tenants_line(
    policy_redis: redis.Redis, upstream: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    from prometheus_client import generate_latest

    from producers import fleet

    metrics = importlib.import_module("producers.http.metrics")

    svc = lined(upstream)
    monkeypatch.setattr(fleet, "services", lambda: svc)
    monkeypatch.setattr(metrics, "services", lambda: svc)
    enqueue_lined(svc, "a", "bulk", 3)
    enqueue_lined(svc, "b", "interactive", 2)
    assert len(pick_next(svc, 3)) == 3  # b's two, then one of a's
    time.sleep(0.05)

    rows = {(r["priority"], r["tenant"]): r for r in fleet.tenant_lines()}
    assert list(rows) == [("interactive", "b"), ("bulk", "a")]
    assert rows[("bulk", "a")]["waiting"] == 2 and rows[("bulk", "a")]["oldest_wait_s"] >= 0
    assert rows[("interactive", "b")]["waiting"] == 0
    assert rows[("interactive", "b")]["budget_share"] == pytest.approx(2 / 3, abs=0.001)
    assert rows[("bulk", "a")]["sends_per_minute"] == pytest.approx(1 / fleet.SHARE_MINUTES)

    text = generate_latest(metrics.fleet_registry(svc)).decode()
    assert 'remixq_tenant_waiting{priority="bulk",provider="kie",tenant="a"} 2.0' in text
    assert 'remixq_tenant_budget_share{priority="interactive",provider="kie",tenant="b"}' in text
