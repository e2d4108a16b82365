"""Bounds of the retry backoff and the poll schedule."""

from __future__ import annotations

import random

import pytest

from worker.policies.poll_schedule import poll_delay
from worker.policies.retry import full_jitter
from worker.settings import Settings, parse_rate_limit


@pytest.mark.parametrize("retry", range(12))
def test_full_jitter_stays_within_exponential_ceiling(retry: int) -> None:
    rng = random.Random(retry)
    delays = [full_jitter(retry, base=1.0, cap=30.0, rng=rng) for _ in range(500)]
    ceiling = min(30.0, 2.0**retry)
    assert all(0.0 <= d <= ceiling for d in delays)
    # Jitter actually spreads the delays over the range.
    assert max(delays) > 0.8 * ceiling and min(delays) < 0.2 * ceiling


def test_full_jitter_honours_floor_but_never_cap() -> None:
    rng = random.Random(1)
    assert all(full_jitter(0, base=1, cap=30, floor=5, rng=rng) >= 5 for _ in range(100))
    assert full_jitter(0, base=1, cap=30, floor=300, rng=rng) == 30


def test_poll_delay_grows_to_maximum() -> None:
    delays = [poll_delay(hop, initial=2, maximum=30) for hop in range(1, 20)]
    assert delays[0] == 2
    assert delays == sorted(delays)
    assert delays[-1] == 30 and max(delays) == 30


def test_poll_settings_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="REMIX_POLL_INITIAL_S"):
        Settings(remix_poll_initial_s=10, remix_poll_max_s=5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20/10s", (20, 10.0)),
        ("5/s", (5, 1.0)),
        ("100/1m", (100, 60.0)),
        ("500/1d", (500, 86400.0)),
    ],
)
def test_parse_rate_limit(text: str, expected: tuple[int, float]) -> None:
    assert parse_rate_limit(text) == expected


@pytest.mark.parametrize("text", ["", "20", "0/10s", "a/b", "20/10x"])
def test_parse_rate_limit_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate_limit(text)
