"""The one retry policy (worker/policies/retry.py): its table and its decisions."""

from __future__ import annotations

import pytest

from worker.policies.retry import (
    SUBMIT_ACTIONS,
    Action,
    key_hold_delay,
    poll_error_delay,
    side_work_try,
    submit_action,
)
from worker.settings import load_settings
from worker.upstreams import errors


def test_every_family_has_an_action() -> None:
    assert set(SUBMIT_ACTIONS) == set(errors.Family)


@pytest.mark.parametrize(
    ("error", "action"),
    [
        (errors.RateLimitedError("slow down"), Action.RETRY),
        (errors.ServerError("oops"), Action.RETRY),
        (errors.NetworkError("reset", ambiguous=False), Action.RETRY),
        (errors.InsufficientCreditsError("no credits"), Action.HOLD_FOR_KEY),
        (errors.MaintenanceError("maintenance"), Action.HOLD_FOR_KEY),
        (errors.UnauthorizedError("no"), Action.FAIL),
        (errors.ValidationFailedError("bad"), Action.FAIL),
        (errors.GenerationFailedError("failed"), Action.FAIL),
        (errors.FeatureDisabledError("off"), Action.FAIL),
    ],
)
def test_the_documented_codes_get_their_action(error: errors.UpstreamError, action: Action) -> None:
    assert submit_action(error) is action


def test_a_side_work_try_retries_until_its_last_then_fails() -> None:
    tries = [
        side_work_try(n, failed=True, permanent=False, most=3, base=1, cap=4) for n in (1, 2, 3)
    ]
    assert [t.outcome for t in tries] == ["retry", "retry", "failed"]
    assert all(0 <= t.retry_in <= 4 for t in tries)
    assert side_work_try(1, failed=True, permanent=True, most=3, base=1, cap=4).outcome == "failed"
    assert side_work_try(2, failed=False, permanent=False, most=3, base=1, cap=4).outcome == "done"


def test_a_poll_error_honours_retry_after_up_to_the_longest_poll() -> None:
    settings = load_settings(remix_poll_max_s=30)
    assert poll_error_delay(2.0, None, settings) == 2.0
    assert poll_error_delay(2.0, 10.0, settings) == 10.0
    assert poll_error_delay(2.0, 300.0, settings) == 30.0


def test_a_job_held_for_its_key_backs_off_within_the_retry_bounds() -> None:
    settings = load_settings(remix_retry_base_s=1, remix_retry_max_s=30)
    first = [key_hold_delay(0, settings) for _ in range(200)]
    late = [key_hold_delay(20, settings) for _ in range(200)]
    assert all(0 <= d <= 1 for d in first)
    assert all(0 <= d <= 30 for d in late) and max(late) > 1  # grown, up to the cap


def test_a_402_of_the_job_alone_waits_like_a_pause_probe() -> None:
    """From REMIX_PAUSE_PROBE_S, growing up to five minutes (the cap wins over a longer probe)."""
    settings = load_settings(remix_pause_probe_s=5, remix_retry_max_s=30)
    first = [key_hold_delay(0, settings, alone=True) for _ in range(200)]
    late = [key_hold_delay(20, settings, alone=True) for _ in range(200)]
    assert all(d == 5 for d in first)
    assert all(5 <= d <= 300 for d in late) and max(late) > 30
    longer_probe = load_settings(remix_pause_probe_s=600)
    assert key_hold_delay(0, longer_probe, alone=True) == 300
