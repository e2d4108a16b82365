"""``remixq retry`` as a subprocess against Redis with no worker (``REMIXQ_TEST_CLI_REDIS_URL``).

Finished jobs are written with the job store itself, in each state that matters: failed
before any answer (retried), accepted upstream or of unknown outcome (skipped unless
``--force``), still queued (never retried).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.helpers import waiting_jobs
from tests.test_cli import CLI_REDIS_URL, cli_redis, remixq  # noqa: F401
from worker.models import JobState
from worker.store.jobs import JobStore

pytestmark = pytest.mark.integration  # every command runs as a process
REQUEST = {
    "prompt": "a knight",
    "image_url": "https://example.test/base.png",
    "reference_image_urls": ["https://example.test/ref.png"],
}
TTL_S = 3600


@pytest.fixture
def store(cli_redis: redis.Redis) -> Iterator[JobStore]:  # noqa: F811
    yield JobStore(cli_redis, TTL_S)


def _failed(store: JobStore, job_id: str, *, task: bool = False, unknown: bool = False) -> str:
    """A finished ``failed`` job: plain, accepted upstream first, or with a lost answer."""
    store.create(job_id, REQUEST, due_in=60, notify_url="https://example.test/hook")
    if task or unknown:
        attempt = store.new_attempt_id()
        assert store.begin_attempt(job_id, attempt, 30).status == "ok"
        if task:
            store.accept(job_id, attempt, f"task-{job_id}", 5)
        else:
            store.end_attempt(job_id, attempt, unknown=True)
    assert store.finish(job_id, JobState.FAILED, fail_code="500", fail_msg="gave up")
    return job_id


def test_retry_one_job_links_the_new_one(store: JobStore, cli_redis: redis.Redis) -> None:  # noqa: F811
    old = _failed(store, "old-plain")
    result = remixq("retry", old)
    assert result.returncode == 0, result.stderr
    new = result.stdout.split()[-1]
    assert result.stdout.strip() == f"retried {old} as {new}"
    record = store.get(new)
    assert record is not None and record.retry_of == old and record.state is JobState.QUEUED
    assert store.get_internal(new, "_request") == REQUEST
    assert store.get_internal(new, "_notify_url") == "https://example.test/hook"
    assert [job["job_id"] for job in waiting_jobs(cli_redis)] == [new]

    again = remixq("retry", old)  # one retry per job, however often asked
    assert again.returncode == 0 and again.stdout.strip() == f"{old} was already retried as {new}"
    assert len(waiting_jobs(cli_redis)) == 1


@pytest.mark.parametrize(("kind", "why"), [("task", "accepted upstream"), ("unknown", "unknown")])
def test_paid_or_possibly_paid_jobs_need_force(
    store: JobStore,
    cli_redis: redis.Redis,  # noqa: F811
    kind: str,
    why: str,
) -> None:
    old = _failed(store, f"old-{kind}", **{kind: True})
    skipped = remixq("retry", old)
    assert skipped.returncode == 1
    assert skipped.stdout.startswith(f"skipped {old}: ") and why in skipped.stdout
    assert waiting_jobs(cli_redis) == []
    forced = remixq("retry", "--force", old)
    assert forced.returncode == 0 and forced.stdout.startswith(f"retried {old} as ")


def test_retry_by_state_and_since(store: JobStore, cli_redis: redis.Redis) -> None:  # noqa: F811
    plain = [_failed(store, f"plain-{i}") for i in range(3)]
    paid = _failed(store, "paid", task=True)
    store.create("queued", REQUEST, due_in=60)
    result = remixq("retry", "--state", "failed", "--since", "1h")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert sorted(line.split()[1] for line in lines if line.startswith("retried")) == plain
    assert [line for line in lines if line.startswith("skipped")] == [
        f"skipped {paid}: it was accepted upstream and paid for; --force retries it anyway"
    ]
    assert len([job for job in waiting_jobs(cli_redis) if job["job_id"] != "queued"]) == 3

    future = remixq("retry", "--state", "failed", "--since", "2999-01-01T00:00:00Z")
    assert (future.returncode, future.stdout) == (0, "")
    assert "no failed job finished since" in future.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("retry",),
        ("retry", "no-such-job"),
        ("retry", "--state", "failed"),
        ("retry", "--state", "failed", "--since", "yesterday"),
        ("retry", "--state", "queued", "--since", "1h"),
        ("retry", "some-job", "--state", "failed", "--since", "1h"),
    ],
)
def test_bad_input_exits_2(store: JobStore, cli_redis: redis.Redis, args: tuple[str, ...]) -> None:  # noqa: F811
    result = remixq(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: ")
    assert waiting_jobs(cli_redis) == []
