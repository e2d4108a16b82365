"""What Flower shows of a task: the reprs set when sending, and a failed job's report."""

from __future__ import annotations

import pytest

from worker.models import JobState
from worker.store.publisher import POLL_IDS_SHOWN, poll_repr, prompt_preview
from worker.task_outcomes import JobsFailed, Outcome, failures, note_outcome, recording_outcomes
from worker.tasks import reported


def test_prompt_preview_keeps_whole_words_on_one_line() -> None:
    assert prompt_preview("a  cat\nin a hat") == "a cat in a hat"
    long = "word " * 40
    preview = prompt_preview(long, limit=20)
    assert preview.endswith("…") and len(preview) <= 21 and "wor…" not in preview
    assert prompt_preview("x" * 30, limit=10) == "x" * 10 + "…"


def test_poll_repr_names_the_batch_and_counts_the_rest() -> None:
    jobs = [(f"job{i}", 1, 0.0) for i in range(POLL_IDS_SHOWN + 3)]
    shown = poll_repr(jobs)
    assert "job0" in shown and f"job{POLL_IDS_SHOWN - 1}" in shown
    assert f"job{POLL_IDS_SHOWN}" not in shown and "'more': 3" in shown


def test_outcomes_are_recorded_only_inside_a_task() -> None:
    note_outcome("outside", JobState.FAILED, {"fail_code": "422"})
    with recording_outcomes() as outcomes:
        note_outcome("a", JobState.SUCCEEDED, {})
        note_outcome("b", JobState.FAILED, {"fail_code": "422", "fail_msg": "bad" * 100})
    assert [o.job_id for o in outcomes] == ["a", "b"]
    assert [o.job_id for o in failures(outcomes)] == ["b"]


def test_a_step_that_failed_jobs_raises_with_their_fail_codes() -> None:
    failed = Outcome("b", JobState.FAILED, "422", "refused")
    assert reported({"job_id": "a"}, [Outcome("a", JobState.SUCCEEDED)]) == {"job_id": "a"}
    with pytest.raises(JobsFailed, match="job b failed: 422 \\(refused\\)") as raised:
        reported({}, [Outcome("a", JobState.SUCCEEDED), failed])
    assert raised.value.job_ids == ["b"]
    assert raised.value.__context__ is None


def test_tasks_report_failures_without_a_retry_or_a_traceback() -> None:
    from worker.app import app

    for name in ("remix.submit", "remix.poll"):
        task = app.tasks[name]
        assert JobsFailed in task.throws and task.ignore_result
        assert task.acks_late and task.acks_on_failure_or_timeout
        assert not getattr(task, "autoretry_for", ())
    assert app.conf.task_send_sent_event and app.conf.worker_send_task_events
