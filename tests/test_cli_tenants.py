"""``remixq submit --tenant --priority`` and ``submit-batch --tenant``, as processes, no worker.

A bad tenant or priority, and a tenant at ``REMIX_TENANT_MAX_WAITING``, exit 2 with one
line and enqueue nothing; a good job's record carries its tenant and priority.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import empty_database
from tests.test_cli import (
    CLI_REDIS_URL,
    CLI_TIMEOUT_S,
    GOOD_LINE,
    REMIXQ,
    REQUIRED,
    assert_refused,
    enqueued,
    write_batch,
)
from worker import keys
from worker.models import JobState
from worker.store.jobs import JobStore

pytestmark = pytest.mark.integration
MAX_WAITING = 2


@pytest.fixture
def cli_redis() -> Iterator[redis.Redis]:
    with empty_database(CLI_REDIS_URL, "the CLI tests") as client:
        yield client


def remixq(*args: str) -> subprocess.CompletedProcess[str]:
    """``remixq ARGS`` against the CLI tests' Redis, tenants limited to :data:`MAX_WAITING`."""
    env = {
        **os.environ,
        "REDIS_URL": CLI_REDIS_URL,
        "RESULT_BACKEND_URL": CLI_REDIS_URL,
        "REMIX_TENANT_MAX_WAITING": str(MAX_WAITING),
    }
    env.pop("KIE_API_KEY", None)
    command = [str(REMIXQ), *args]
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False
    )


def record(client: redis.Redis, job_id: str) -> dict[str, object]:
    raw = client.hgetall(keys.job(job_id))
    return {k.decode(): json.loads(v) for k, v in raw.items() if not k.startswith(b"_")}


def test_submit_names_the_tenant_and_the_priority(cli_redis: redis.Redis) -> None:
    result = remixq("submit", *REQUIRED, "--tenant", "svc-a", "--priority", "interactive")

    assert result.returncode == 0, result.stderr
    fields = record(cli_redis, result.stdout.strip())
    assert (fields["tenant"], fields["priority"]) == ("svc-a", "interactive")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--tenant", "svc a"], "tenant: must be 1 to 64 letters"),
        (["--tenant", "x" * 65], "tenant: must be 1 to 64 letters"),
        (["--priority", "urgent"], "--priority"),
    ],
)
def test_a_bad_tenant_or_priority_exits_2_in_one_line(
    cli_redis: redis.Redis, args: list[str], expected: str
) -> None:
    result = remixq("submit", *REQUIRED, *args)

    assert_refused(result, expected)
    assert enqueued(cli_redis) == (0, set())


def test_a_tenant_at_its_limit_exits_2_and_another_tenant_goes_on(cli_redis: redis.Redis) -> None:
    for _ in range(MAX_WAITING):
        assert remixq("submit", *REQUIRED, "--tenant", "svc-a").returncode == 0
    before = enqueued(cli_redis)

    refused = remixq("submit", *REQUIRED, "--tenant", "svc-a")

    assert_refused(refused, "tenant svc-a has 2 job(s) waiting", "REMIX_TENANT_MAX_WAITING")
    assert enqueued(cli_redis) == before
    assert remixq("submit", *REQUIRED, "--tenant", "svc-b").returncode == 0


def test_a_batch_takes_a_priority_per_line_and_its_tenant_from_the_option(
    cli_redis: redis.Redis, tmp_path: Path
) -> None:
    batch = write_batch(tmp_path / "jobs.jsonl", {**GOOD_LINE, "priority": "bulk"}, GOOD_LINE)

    result = remixq("submit-batch", str(batch), "--tenant", "svc-a")

    assert result.returncode == 0, result.stderr
    fields = [record(cli_redis, job_id) for job_id in result.stdout.split()]
    assert [(f["tenant"], f["priority"]) for f in fields] == [
        ("svc-a", "bulk"),
        ("svc-a", "normal"),
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ({**GOOD_LINE, "priority": "urgent"}, "line 2: invalid request: priority: must be one of"),
        (
            {**GOOD_LINE, "tenant": "svc-b"},
            "line 2: tenant: give it for the whole batch with --tenant",
        ),
    ],
)
def test_a_bad_priority_or_a_tenant_on_a_line_refuses_the_whole_batch(
    cli_redis: redis.Redis, tmp_path: Path, line: dict[str, object], expected: str
) -> None:
    batch = write_batch(tmp_path / "jobs.jsonl", GOOD_LINE, line)

    assert_refused(remixq("submit-batch", str(batch)), expected)
    assert enqueued(cli_redis) == (0, set())


def test_a_bad_batch_tenant_exits_2(cli_redis: redis.Redis, tmp_path: Path) -> None:
    batch = write_batch(tmp_path / "jobs.jsonl", GOOD_LINE)

    assert_refused(remixq("submit-batch", str(batch), "--tenant", "a/b"), "tenant:")
    assert enqueued(cli_redis) == (0, set())


def test_a_batch_the_tenant_has_no_room_for_enqueues_nothing(
    cli_redis: redis.Redis, tmp_path: Path
) -> None:
    assert remixq("submit", *REQUIRED, "--tenant", "svc-a").returncode == 0
    before = enqueued(cli_redis)
    batch = write_batch(tmp_path / "jobs.jsonl", GOOD_LINE, GOOD_LINE)

    refused = remixq("submit-batch", str(batch), "--tenant", "svc-a")

    assert_refused(refused, "tenant svc-a has 1 job(s) waiting", "2 more refused")
    assert enqueued(cli_redis) == before


def test_a_batch_of_keys_already_enqueued_needs_no_room(
    cli_redis: redis.Redis, tmp_path: Path
) -> None:
    lines = [{**GOOD_LINE, "idempotency_key": f"k-{i}"} for i in range(MAX_WAITING)]
    batch = write_batch(tmp_path / "jobs.jsonl", *lines)
    first = remixq("submit-batch", str(batch), "--tenant", "svc-a")
    assert first.returncode == 0, first.stderr

    again = remixq("submit-batch", str(batch), "--tenant", "svc-a")

    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout


def _failed_job(client: redis.Redis, job_id: str, tenant: str, priority: str) -> str:
    store = JobStore(client, 3600)
    store.create(job_id, GOOD_LINE, due_in=60, tenant=tenant, priority=priority)
    assert store.finish(job_id, JobState.FAILED, fail_code="500", fail_msg="gave up")
    return job_id


def test_a_retry_keeps_the_tenant_and_the_priority(cli_redis: redis.Redis) -> None:
    old = _failed_job(cli_redis, "old-tenant", "svc-a", "bulk")

    result = remixq("retry", old)

    assert result.returncode == 0, result.stderr
    new = record(cli_redis, result.stdout.split()[-1])
    assert (new["tenant"], new["priority"], new["retry_of"]) == ("svc-a", "bulk", old)


def test_a_retry_for_a_tenant_at_its_limit_is_skipped(cli_redis: redis.Redis) -> None:
    old = _failed_job(cli_redis, "old-full", "svc-a", "normal")
    for _ in range(MAX_WAITING):
        assert remixq("submit", *REQUIRED, "--tenant", "svc-a").returncode == 0
    before = enqueued(cli_redis)

    result = remixq("retry", old)

    assert result.returncode == 1
    assert result.stdout.strip() == (
        f"skipped {old}: its tenant has as many jobs waiting as REMIX_TENANT_MAX_WAITING allows"
    )
    assert enqueued(cli_redis) == before
