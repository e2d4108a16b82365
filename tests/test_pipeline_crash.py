"""A worker killed with SIGKILL mid-job: its jobs finish elsewhere, none is paid twice."""

from __future__ import annotations

import time

import pytest
import redis

from producers import enqueue_remix, get_job, wait_for_job
from sandbox.control import SandboxControl
from tests.conftest import REMIX_INPUT, StartWorkers, unique_prompt
from tests.helpers import accepted, wait_until
from worker.models import JobState

pytestmark = [pytest.mark.integration, pytest.mark.slow]
JOBS = 12
#: Visibility timeout (90 s) or the watchdog (100 s) + sweep + the job itself: about two minutes.
RECOVERY_BUDGET_S = 170


def test_sigkilled_worker_jobs_finish_elsewhere_without_second_upstream_task(
    control: SandboxControl, start_workers: StartWorkers, redis_client: redis.Redis
) -> None:
    control.configure(generation_seconds=4.0)
    victim, survivor = start_workers(2, concurrency=2)
    prompts = [unique_prompt(f"crash-{i}") for i in range(JOBS)]
    job_ids = [enqueue_remix(prompt=p, **REMIX_INPUT) for p in prompts]  # type: ignore[arg-type]

    # Kill once jobs are in flight: some submitted upstream, some still polling.
    wait_until(
        lambda: sum(1 for j in job_ids if (get_job(j) or get_job(j)).upstream_task_id) >= JOBS // 3,  # type: ignore[union-attr]
        timeout=30,
    )
    unacked_before = redis_client.hlen("unacked")
    victim.kill()
    killed_at = time.monotonic()
    assert unacked_before > 0  # the victim (or its peer) really held messages

    records = [wait_for_job(j, timeout=RECOVERY_BUDGET_S) for j in job_ids]

    assert all(r.state is JobState.SUCCEEDED for r in records), [r.state for r in records]
    assert time.monotonic() - killed_at < RECOVERY_BUDGET_S
    assert [accepted(control, p) for p in prompts] == [1] * JOBS
    assert survivor.popen.poll() is None
