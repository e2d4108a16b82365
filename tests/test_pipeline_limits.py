"""Deadlines and retry budgets, with workers whose limits are short."""

from __future__ import annotations

import time

import pytest

from producers import enqueue_remix, wait_for_job
from sandbox.control import SandboxControl
from tests.conftest import REMIX_INPUT, unique_prompt
from tests.helpers import accepted, create_requests
from worker.models import JobState

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("fleet")]
WORKER_COUNT = 1
DEADLINE_S = 3
MAX_RETRIES = 2
# Roomy: under a loaded machine a job may wait a few seconds for its first send.
SUBMIT_DEADLINE_S = 8
WORKER_SETTINGS = {
    "REMIX_DEADLINE_S": str(DEADLINE_S),
    "REMIX_MAX_RETRIES": str(MAX_RETRIES),
    "REMIX_SUBMIT_DEADLINE_S": str(SUBMIT_DEADLINE_S),
    "KIE_REQUEST_DEADLINE_S": "2",
}


def test_job_unfinished_upstream_past_deadline_fails_with_timeout(
    control: SandboxControl,
) -> None:
    prompt = unique_prompt("[sandbox:seconds=60] slow")
    job_id = enqueue_remix(prompt=prompt, **REMIX_INPUT)  # type: ignore[arg-type]

    record = wait_for_job(job_id, timeout=30)

    assert record.state is JobState.FAILED and record.fail_code == "timeout"
    assert record.finished_at is not None and record.submitted_at is not None
    elapsed = record.finished_at - record.submitted_at
    assert DEADLINE_S <= elapsed < DEADLINE_S + 3
    assert accepted(control, prompt) == 1


@pytest.mark.parametrize("code", [429, 500])
def test_retries_run_out_and_the_job_fails_with_the_last_code(
    control: SandboxControl, code: int
) -> None:
    control.configure(faults={code: 1.0}, fault_endpoints=["createTask"])
    prompt = unique_prompt(f"exhaust-{code}")
    started = time.monotonic()

    record = wait_for_job(enqueue_remix(prompt=prompt, **REMIX_INPUT), timeout=30)  # type: ignore[arg-type]

    assert record.state is JobState.FAILED and record.fail_code == str(code)
    assert record.submit_attempts == MAX_RETRIES + 1 == create_requests(control, prompt)
    assert time.monotonic() - started < 20


def test_job_held_by_a_pause_past_its_submit_deadline_fails_with_the_last_code(
    control: SandboxControl,
) -> None:
    control.configure(credits=0)
    prompt = unique_prompt("no-credits")
    try:
        record = wait_for_job(enqueue_remix(prompt=prompt, **REMIX_INPUT), timeout=30)  # type: ignore[arg-type]
    finally:
        from producers.fleet import resume_submissions

        control.configure(credits=None)
        resume_submissions()

    assert record.state is JobState.FAILED and record.fail_code == "402"
    assert record.finished_at is not None
    # A held job wakes as the pause's probe interval doubles (1, 2, 4, 8 s ...): the first
    # wake past the deadline ends it, within about the deadline again.
    assert SUBMIT_DEADLINE_S <= record.finished_at - record.created_at < 2 * SUBMIT_DEADLINE_S + 8
    assert accepted(control, prompt) == 0
