"""The I/O-bound pools: ``-P threads`` and ``-P gevent`` run the same pipeline."""

from __future__ import annotations

import pytest

from producers import enqueue_remix, wait_for_job
from sandbox.control import SandboxControl
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

    records = [
        wait_for_job(enqueue_remix(prompt=p, **REMIX_INPUT), timeout=60)  # type: ignore[arg-type]
        for p in prompts
    ]

    assert [r.state for r in records] == [JobState.SUCCEEDED] * JOBS
    assert [accepted(control, p) for p in prompts] == [1] * JOBS
