"""The shared budget's reservations and holds, against a real Redis (no workers)."""

from __future__ import annotations

import uuid

import pytest
import redis

from worker.limits.ratelimit import LATENESS_TOLERANCE_S, SharedRateLimiter

LIMIT, WINDOW_S = 5, 2.0
MAX_AHEAD_S = 10.0


@pytest.fixture
def limiter(redis_client: redis.Redis) -> SharedRateLimiter:
    return SharedRateLimiter(redis_client, f"test-{uuid.uuid4().hex[:8]}", LIMIT, WINDOW_S)


def _max_in_any_window(moments: list[float], window: float) -> int:
    moments = sorted(moments)
    return max(sum(1 for t in moments[i:] if t - m < window) for i, m in enumerate(moments))


def test_reservations_never_put_more_than_the_limit_in_any_window(
    limiter: SharedRateLimiter,
) -> None:
    reservations = [limiter.reserve(MAX_AHEAD_S) for _ in range(4 * LIMIT)]

    assert all(r.reserved for r in reservations)
    assert [r.delay for r in reservations[:LIMIT]] == pytest.approx([0] * LIMIT, abs=0.05)
    moments = [r.at for r in reservations]
    # Even sends that run late by the tolerance stay within the upstream's window.
    assert _max_in_any_window(moments, WINDOW_S + LATENESS_TOLERANCE_S) <= LIMIT
    span = max(moments) - min(moments)
    assert span == pytest.approx(3 * (WINDOW_S + LATENESS_TOLERANCE_S), abs=0.1)


def test_a_moment_too_far_ahead_is_not_reserved(limiter: SharedRateLimiter) -> None:
    for _ in range(LIMIT):
        assert limiter.reserve(MAX_AHEAD_S).reserved
    refused = limiter.reserve(max_ahead=0.5)
    assert not refused.reserved
    assert refused.delay == pytest.approx(WINDOW_S + LATENESS_TOLERANCE_S, abs=0.1)
    assert limiter.usage().used_in_window == LIMIT


def test_an_upstream_429_holds_every_reservation(limiter: SharedRateLimiter) -> None:
    limiter.block(3.0)
    held = limiter.reserve(MAX_AHEAD_S)
    assert held.reserved and held.delay == pytest.approx(3.0, abs=0.1)
    limiter.block(1.0)  # a shorter hold never shortens the current one
    assert limiter.reserve(MAX_AHEAD_S).delay >= 2.8
    assert limiter.usage().blocked_for > 2.5
