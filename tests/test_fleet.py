"""The fleet as one careful client: shared budget, whole-key pauses, the operator's view."""

from __future__ import annotations

import time

import pytest

from producers import enqueue_remix, get_job, wait_for_job
from producers.fleet import fleet_status, pause_submissions, resume_submissions
from sandbox.control import SandboxControl
from sandbox.launch import ManagedProcess
from tests.conftest import REMIX_INPUT, unique_prompt
from tests.helpers import accepted, create_requests, wait_until
from worker.app import services
from worker.limits.pause import RUN_IN_A_ROW
from worker.models import JobState
from worker.store.jobs import RETRIES_FIELD

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("fleet")]
WORKER_COUNT = 3
LIMIT, WINDOW_S = 5, 2.0
WORKER_SETTINGS = {"KIE_RATE_LIMIT": f"{LIMIT}/{WINDOW_S:g}s", "REMIX_PAUSE_PROBE_S": "1"}
JOB_TIMEOUT_S = 60


def _enqueue_many(label: str, count: int) -> tuple[list[str], list[str]]:
    prompts = [unique_prompt(f"{label}-{i}") for i in range(count)]
    return prompts, [enqueue_remix(prompt=p, **REMIX_INPUT) for p in prompts]  # type: ignore[arg-type]


def _max_in_any_window(stamps: list[float], window: float) -> int:
    stamps = sorted(stamps)
    return max(sum(1 for t in stamps[i:] if t - start < window) for i, start in enumerate(stamps))


def _paused_reason() -> str | None:
    keys = fleet_status()["keys"]
    paused = [k["paused"] for k in keys if k["paused"]]
    return paused[0]["reason"] if paused else None


def test_workers_share_one_budget_and_get_no_429(control: SandboxControl) -> None:
    control.configure(rate_limit=f"{LIMIT}/{WINDOW_S:g}s", generation_seconds=0.5)
    before = control.stats()
    jobs = 4 * LIMIT

    _, job_ids = _enqueue_many("budget", jobs)
    records = [wait_for_job(j, timeout=JOB_TIMEOUT_S) for j in job_ids]

    stats = control.stats()
    assert all(r.state is JobState.SUCCEEDED for r in records)
    assert stats["rate_limited"] == before["rate_limited"], "the upstream answered 429"
    assert all(r.submit_attempts == 1 for r in records)
    stamps = stats["accepted_at"][len(before["accepted_at"]) :]
    assert len(stamps) == jobs
    assert _max_in_any_window(stamps, WINDOW_S) <= LIMIT
    # Held to the budget, but not much slower than it allows.
    ideal = (jobs / LIMIT - 1) * WINDOW_S
    assert ideal <= max(stamps) - min(stamps) <= ideal * 1.5


def test_maintenance_pauses_every_worker_and_resumes_by_probe(control: SandboxControl) -> None:
    control.configure(maintenance=True)
    prompts, job_ids = _enqueue_many("maintenance", 4)
    wait_until(lambda: _paused_reason() == "455", timeout=20)
    # A submit that passed the gate just before the pause still sends: let it finish.
    wait_until(lambda: all(get_job(j).attempt_started_at is None for j in job_ids), timeout=20)  # type: ignore[union-attr]
    sent = sum(create_requests(control, p) for p in prompts)
    time.sleep(3)  # several probe intervals: jobs must stay held, sending nothing

    # Before the pause: each job's first try, and at most a run's worth of 455s more.
    assert sum(create_requests(control, p) for p in prompts) == sent
    assert sent <= len(prompts) + RUN_IN_A_ROW
    for job_id in job_ids:
        assert get_job(job_id).state is JobState.QUEUED  # type: ignore[union-attr]
        assert not services().store.get_internal(job_id, RETRIES_FIELD)

    control.configure(maintenance=False)
    records = [wait_for_job(j, timeout=JOB_TIMEOUT_S) for j in job_ids]
    assert all(r.state is JobState.SUCCEEDED for r in records)
    assert [accepted(control, p) for p in prompts] == [1] * len(prompts)
    assert _paused_reason() is None


def test_insufficient_credits_pause_logs_once_and_resume(
    control: SandboxControl, fleet: list[ManagedProcess]
) -> None:
    pauses_before = fleet_status()["metrics"].get("pauses_total:402", 0)
    logs_before = sum(_log(w).count("upstream answered 402") for w in fleet)
    control.configure(credits=0)
    prompts, job_ids = _enqueue_many("credits", 5)
    wait_until(lambda: _paused_reason() == "402", timeout=20)
    time.sleep(2)

    assert fleet_status()["metrics"]["pauses_total:402"] == pauses_before + 1
    assert sum(_log(w).count("upstream answered 402") for w in fleet) == logs_before + 1
    assert all(get_job(j).state is JobState.QUEUED for j in job_ids)  # type: ignore[union-attr]

    control.configure(credits=1000)
    records = [wait_for_job(j, timeout=JOB_TIMEOUT_S) for j in job_ids]
    assert all(r.state is JobState.SUCCEEDED for r in records)
    assert [accepted(control, p) for p in prompts] == [1] * len(prompts)


def test_operator_pause_holds_until_resume(control: SandboxControl) -> None:
    assert pause_submissions("maintenance window")
    try:
        prompts, job_ids = _enqueue_many("operator", 2)
        time.sleep(3)
        assert [create_requests(control, p) for p in prompts] == [0, 0]
        assert _paused_reason() == "operator"
    finally:
        assert resume_submissions()
    records = [wait_for_job(j, timeout=JOB_TIMEOUT_S) for j in job_ids]
    assert all(r.state is JobState.SUCCEEDED for r in records)


def test_fleet_status_reports_queues_states_and_budget(control: SandboxControl) -> None:
    control.configure(generation_seconds=30)
    _, job_ids = _enqueue_many("status", 3)
    wait_until(lambda: all(get_job(j).upstream_task_id for j in job_ids), timeout=20)  # type: ignore[union-attr]

    status = fleet_status()

    assert status["in_flight_upstream"] >= 3
    assert set(status["queues"]) == {"submit", "poll", "notify", "archive"}
    assert status["keys"] and status["keys"][0]["rate_limit"] == WORKER_SETTINGS["KIE_RATE_LIMIT"]
    assert status["keys"][0]["sent_in_window"] >= 1


def _log(worker: ManagedProcess) -> str:
    assert worker.log_path is not None
    return worker.log_path.read_text(errors="replace")
