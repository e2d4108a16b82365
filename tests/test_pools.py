"""The pools: ``-P threads`` and ``-P gevent`` run the same pipeline; the prefork pool's
size comes from ``REMIX_WORKER_CONCURRENCY`` unless ``-c`` is given."""

from __future__ import annotations

from pathlib import Path

import pytest

from producers import enqueue_remix, wait_for_job
from sandbox.control import SandboxControl
from sandbox.launch import ManagedProcess
from tests.conftest import REMIX_INPUT, StartWorkers, unique_prompt
from tests.helpers import accepted
from worker.models import JobState

pytestmark = pytest.mark.integration
JOBS = 12


@pytest.mark.parametrize("pool", ["threads", "gevent"])
def test_io_pool_runs_the_pipeline(
    pool: str, control: SandboxControl, start_workers: StartWorkers
) -> None:
    control.configure(faults={500: 0.2}, fault_endpoints=["createTask", "recordInfo"])
    start_workers(1, concurrency=20, pool=pool)
    prompts = [unique_prompt(f"{pool}-{i}") for i in range(JOBS)]
    # All in at once, so that the pool runs them side by side (not one job after another).
    job_ids = [enqueue_remix(prompt=p, **REMIX_INPUT) for p in prompts]  # type: ignore[arg-type]

    records = [wait_for_job(job_id, timeout=60) for job_id in job_ids]

    assert [r.state for r in records] == [JobState.SUCCEEDED] * JOBS
    assert [accepted(control, p) for p in prompts] == [1] * JOBS


def pool_children(worker: ManagedProcess) -> int:
    """How many processes the worker's main process has (its prefork pool)."""
    pid = worker.popen.pid
    return len((Path(f"/proc/{pid}/task/{pid}/children").read_text()).split())


def test_a_worker_without_c_takes_its_pool_size_from_the_setting(
    start_workers: StartWorkers,
) -> None:
    (worker,) = start_workers(1, concurrency=None, REMIX_WORKER_CONCURRENCY="3")
    assert pool_children(worker) == 3


def test_an_explicit_c_wins_over_the_setting(start_workers: StartWorkers) -> None:
    (worker,) = start_workers(1, concurrency=1, REMIX_WORKER_CONCURRENCY="3")
    assert pool_children(worker) == 1
