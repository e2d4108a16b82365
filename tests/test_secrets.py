"""The API key, as a real deployment hands it over (a secret file ending in a newline).

A worker started with ``KIE_API_KEY="<key>\\n"`` must work, and the key must appear in none
of: the worker's log, any Redis value, any job record or Celery result, or the task
arguments a monitor such as Flower shows.
"""

from __future__ import annotations

import pytest
import redis
from celery.result import AsyncResult

from producers import enqueue_remix, wait_for_job
from sandbox.control import SandboxControl
from tests.conftest import REMIX_INPUT, SECRET_API_KEY, StartWorkers, unique_prompt
from tests.helpers import accepted, redis_value
from worker.app import app
from worker.models import JobState

pytestmark = pytest.mark.integration
JOB_TIMEOUT_S = 60


def _fragments(secret: str) -> list[bytes]:
    return [secret[i : i + 10].encode() for i in range(0, len(secret) - 9, 5)]


def test_a_key_from_a_secret_file_works_and_never_shows(
    control: SandboxControl, redis_client: redis.Redis, start_workers: StartWorkers
) -> None:
    # Many faults, so many error messages; retries enough that no job runs out of them.
    (worker,) = start_workers(1, KIE_API_KEY=SECRET_API_KEY + "\n", REMIX_MAX_RETRIES="40")
    control.configure(faults={500: 0.3, 429: 0.2}, fault_style="page", cut_rate=0.1)
    prompts = [unique_prompt(f"secret-file-{i}") for i in range(6)]
    job_ids = [enqueue_remix(prompt=p, **REMIX_INPUT) for p in prompts]  # type: ignore[arg-type]

    records = [wait_for_job(j, timeout=JOB_TIMEOUT_S) for j in job_ids]

    failed = [(r.fail_code, r.fail_msg) for r in records if r.state is not JobState.SUCCEEDED]
    assert not failed
    assert all(accepted(control, p) >= 1 for p in prompts)
    secret_parts = _fragments(SECRET_API_KEY)
    for key in redis_client.scan_iter("*"):
        value = redis_value(redis_client, key)
        assert not any(part in value or part in key for part in secret_parts), key
    for job_id in job_ids:
        result = repr(AsyncResult(job_id, app=app).get(timeout=5)).encode()
        assert not any(part in result for part in secret_parts)
    assert worker.log_path is not None
    log = worker.log_path.read_bytes()
    assert b"remix.submit" in log
    assert not any(part in log for part in secret_parts)
