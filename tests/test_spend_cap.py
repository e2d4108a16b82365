"""The spend cap holds across the fleet: real worker processes, the sandbox over HTTP."""

from __future__ import annotations

import pytest

from producers import enqueue_remix, get_job, wait_for_job
from producers.fleet import fleet_status
from sandbox.control import SandboxControl
from tests.conftest import REMIX_INPUT, unique_prompt
from tests.helpers import wait_until, waiting_jobs
from worker import keys
from worker.app import services
from worker.fleet.registry import known_api_keys
from worker.models import JobRecord, JobState
from worker.store.jobs import RETRIES_FIELD

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("fleet")]
WORKER_COUNT = 3
LIMIT, WINDOW_S, JOBS = 4, 8.0, 10
WORKER_SETTINGS = {"REMIX_SPEND_CAP": f"{LIMIT}/{WINDOW_S:g}s,1000/1d"}
JOB_TIMEOUT_S = 60


def _max_in_any_window(stamps: list[float], window: float) -> int:
    stamps = sorted(stamps)
    return max(sum(1 for t in stamps[i:] if t - start < window) for i, start in enumerate(stamps))


def _spend_status() -> list[dict[str, float]]:
    """The spend per window of the workers' key (the only capped one)."""
    (spend,) = [k["spend"] for k in fleet_status()["keys"] if k["spend"]]
    return list(spend)


def _queued(job_ids: list[str]) -> list[JobRecord]:
    return [r for r in map(get_job, job_ids) if r is not None and r.state is JobState.QUEUED]


def test_the_fleet_spends_no_more_than_the_cap(control: SandboxControl) -> None:
    svc = services()
    for key_id in known_api_keys(services()):  # a fresh cap for this test
        svc.broker.delete(keys.spend_log(key_id))
    before = len(control.stats()["accepted_at"])
    prompts = [unique_prompt(f"spend-{i}") for i in range(JOBS)]
    job_ids = [enqueue_remix(prompt=p, **REMIX_INPUT) for p in prompts]  # type: ignore[arg-type]

    # The first window's worth is accepted; the rest wait queued in line, no retry spent.
    wait_until(lambda: len(control.stats()["accepted_at"]) - before >= LIMIT, timeout=20)
    # The sandbox counts an acceptance before the worker records it: wait for the records.
    wait_until(lambda: len(_queued(job_ids)) <= JOBS - LIMIT, timeout=20)
    waiting = _queued(job_ids)
    assert len(waiting) == JOBS - LIMIT
    assert all(r.submit_attempts == 0 for r in waiting)
    status = _spend_status()
    assert [(s["limit"], s["window_s"]) for s in status] == [(LIMIT, WINDOW_S), (1000, 86400.0)]
    assert status[0]["spent"] == LIMIT
    in_line = {job["job_id"] for job in waiting_jobs(svc.store.redis)}
    assert {r.job_id for r in waiting} <= in_line  # at their places, holding nothing

    records = [wait_for_job(j, timeout=JOB_TIMEOUT_S) for j in job_ids]

    assert all(r.state is JobState.SUCCEEDED for r in records)
    assert all(r.submit_attempts == 1 for r in records)
    assert not any(svc.store.get_internal(j, RETRIES_FIELD) for j in job_ids)
    stamps = control.stats()["accepted_at"][before:]
    assert len(stamps) == JOBS
    assert _max_in_any_window(stamps, WINDOW_S) <= LIMIT
    # Held to the cap, but not much slower than it allows.
    ideal = (-(-JOBS // LIMIT) - 1) * WINDOW_S
    assert ideal <= max(stamps) - min(stamps) <= ideal + WINDOW_S
    assert _spend_status()[1]["spent"] == JOBS
