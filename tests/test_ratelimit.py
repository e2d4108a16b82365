"""The shared budget's send moments and holds, against a real Redis (no workers)."""

from __future__ import annotations

import math
import time
import uuid

import pytest
import redis

from worker import keys
from worker.limits import ratelimit
from worker.limits.ratelimit import BURST_KEEPS, SharedRateLimiter

LIMIT, WINDOW_S = 5, 2.0
#: What one burst grants of an idle key: all but the moments it keeps for later arrivals.
BURST = LIMIT - math.ceil(LIMIT * BURST_KEEPS)


@pytest.fixture
def limiter(redis_client: redis.Redis) -> SharedRateLimiter:
    return SharedRateLimiter(redis_client, f"test-{uuid.uuid4().hex[:8]}", LIMIT, WINDOW_S)


def _max_in_any_window(moments: list[float], window: float) -> int:
    moments = sorted(moments)
    return max(sum(1 for t in moments[i:] if t - m < window) for i, m in enumerate(moments))


def _send_log(limiter: SharedRateLimiter) -> list[float]:
    return [score for _, score in limiter.redis.zrange(limiter._log_key, 0, -1, withscores=True)]


def test_no_backlog_takes_every_free_moment_at_once(limiter: SharedRateLimiter) -> None:
    grants = limiter.grant(waiting=3, most=100)
    assert len(grants.members) == 3 and grants.next_in == 0
    assert limiter.usage().granted_unused == 3


def test_granted_and_unused_moments_count_against_the_limit(limiter: SharedRateLimiter) -> None:
    first = limiter.grant(waiting=BURST, most=100)
    assert len(first.members) == BURST
    assert len(limiter.grant(waiting=1, most=100).members) == 1  # the one kept free
    again = limiter.grant(waiting=LIMIT, most=100)
    assert again.members == [] and again.next_in > 0

    limiter.give_back(first.members[:2])
    assert len(limiter.grant(waiting=2, most=100).members) == 2


def test_a_backlog_is_paced_and_no_window_holds_more_than_the_limit(
    limiter: SharedRateLimiter,
) -> None:
    """Jobs always waiting: each moment is used as it is granted; the sends, logged when
    they are made, never put more than the limit in any window, and come one per period."""
    sent: list[float] = []
    deadline = time.monotonic() + 2.5 * WINDOW_S
    while time.monotonic() < deadline:
        grants = limiter.grant(waiting=100, most=100)
        for member in grants.members:
            assert limiter.consume(member)
        sent += [limiter.now()] * len(grants.members)
        time.sleep(min(0.05, grants.next_in))
    log = _send_log(limiter)
    assert _max_in_any_window(log, WINDOW_S) <= LIMIT
    # Paced: at most one moment per period, and one period's credit after a late round.
    assert _max_in_any_window(sent, limiter.period * 0.9) <= 2
    assert len(sent) >= 2.5 * LIMIT - 2


def test_a_used_or_returned_moment_cannot_be_used_again(limiter: SharedRateLimiter) -> None:
    (used, returned) = limiter.grant(waiting=2, most=2).members
    assert limiter.consume(used)
    assert not limiter.consume(used)
    limiter.give_back([returned])
    assert not limiter.consume(returned)
    assert limiter.usage().used_in_window == 1


def test_a_moment_not_used_in_time_is_void(
    limiter: SharedRateLimiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ratelimit, "GRANT_VALID_S", 0.2)
    (member,) = limiter.grant(waiting=1, most=1).members
    time.sleep(0.3)
    assert not limiter.consume(member)
    assert limiter.usage().granted_unused == 0
    assert len(limiter.grant(waiting=BURST, most=100).members) == BURST  # nothing was lost


def test_an_upstream_429_holds_every_moment(limiter: SharedRateLimiter) -> None:
    (granted,) = limiter.grant(waiting=1, most=1).members
    limiter.block(3.0)
    held = limiter.grant(waiting=5, most=5)
    assert held.members == [] and held.next_in == pytest.approx(3.0, abs=0.1)
    assert not limiter.consume(granted)  # granted before the 429: not sent during the hold
    limiter.block(1.0)  # a shorter hold never shortens the current one
    assert limiter.grant(waiting=5, most=5).next_in >= 2.8
    assert limiter.usage().blocked_for > 2.5
    assert limiter.clear_block()
    assert len(limiter.grant(waiting=BURST, most=5).members) == BURST


def test_a_paused_key_grants_nothing(limiter: SharedRateLimiter) -> None:
    pause_key = keys.pause(limiter._log_key.split(":")[2])
    limiter.redis.hset(pause_key, "reason", "455")
    assert limiter.grant(waiting=5, most=5).members == []
    limiter.redis.delete(pause_key)
    assert len(limiter.grant(waiting=BURST, most=5).members) == BURST


def test_a_full_spend_cap_grants_nothing(limiter: SharedRateLimiter) -> None:
    spend_log = keys.spend_log(limiter._log_key.split(":")[2])
    limiter.redis.zadd(spend_log, {"spent": limiter.now()})
    assert limiter.grant(waiting=5, most=5, spend_caps=[(1, 60.0)]).members == []
    assert len(limiter.grant(waiting=5, most=5, spend_caps=[(3, 60.0)]).members) == 2


def test_a_pace_set_under_a_slower_limit_does_not_hold_a_faster_one(
    redis_client: redis.Redis,
) -> None:
    key_id = f"test-{uuid.uuid4().hex[:8]}"
    slow = SharedRateLimiter(redis_client, key_id, 20, 600.0)
    assert len(slow.grant(waiting=18, most=20).members) == 18  # the pace runs 9 min ahead
    redis_client.delete(keys.rate_pending(key_id))  # as if those sends were long ago
    fast = SharedRateLimiter(redis_client, key_id, 100, 1.0)
    redis_client.delete(keys.rate_log(key_id))

    first = fast.grant(waiting=500, most=500)
    assert first.next_in <= 1.0  # within the new window, not ten minutes
    time.sleep(first.next_in + 0.05)
    assert fast.grant(waiting=500, most=500).members
