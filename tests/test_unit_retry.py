"""The retry policy (which finished jobs ``remixq retry`` replays) and ``--since``."""

from __future__ import annotations

import pytest

from producers.retry import parse_since, refusal
from worker.models import JobRecord, JobState

NOW = 1_800_000_000.0


def _record(state: JobState = JobState.FAILED, **fields: object) -> JobRecord:
    return JobRecord.model_validate({"job_id": "j", "state": state, "created_at": 1.0, **fields})


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({}, None),
        ({"state": JobState.CANCELLED}, None),
        ({"state": JobState.QUEUED}, "unfinished"),
        ({"state": JobState.RUNNING, "upstream_task_id": "t"}, "unfinished"),
        ({"upstream_task_id": "t"}, "accepted"),
        ({"state": JobState.SUCCEEDED, "upstream_task_id": "t"}, "accepted"),
        ({"extra_task_ids": ["t2"]}, "accepted"),
        ({"unknown_outcomes": 1}, "unknown_outcome"),
    ],
)
def test_what_is_refused(fields: dict[str, object], reason: str | None) -> None:
    assert refusal(_record(**fields)) == reason  # type: ignore[arg-type]


def test_force_overrides_money_but_never_an_unfinished_job() -> None:
    assert refusal(_record(upstream_task_id="t", unknown_outcomes=2), force=True) is None
    assert refusal(_record(JobState.SUBMITTED), force=True) == "unfinished"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2h", NOW - 7200),
        ("30m", NOW - 1800),
        ("90", NOW - 90),
        ("1d", NOW - 86400),
        ("2027-01-15T08:00:00Z", 1_800_000_000.0 - 0),
        ("2027-01-15T09:00:00+01:00", 1_800_000_000.0),
        ("2027-01-15T08:00:00", 1_800_000_000.0),
    ],
)
def test_since(text: str, expected: float) -> None:
    assert parse_since(text, NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["yesterday", "-2h", "2w", ""])
def test_since_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="--since"):
        parse_since(text, NOW)
