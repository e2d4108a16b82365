"""The Python API's ``tenant=`` and ``priority=``, and ``QueueFull``: real Redis, no worker.

This process is configured with ``REMIX_TENANT_MAX_WAITING``; each test's jobs stay
``queued`` and are cancelled after it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from producers import QueueFull, cancel_job, enqueue_remix, get_job
from sandbox.images import render_png
from tests.conftest import REMIX_INPUT, TEST_REDIS_URL, unique_prompt
from worker import keys
from worker.app import configure

pytestmark = pytest.mark.integration
MAX_WAITING = 2
IMAGE = render_png("api-tenants", 0, "tenants", "square")


@pytest.fixture
def limited(redis_client: redis.Redis) -> Iterator[list[str]]:
    """This process with tenants limited to :data:`MAX_WAITING` waiting jobs; yields a list
    where a test puts its job ids (cancelled after it)."""
    configure(
        redis_url=TEST_REDIS_URL,
        result_backend_url=TEST_REDIS_URL,
        remix_tenant_max_waiting=MAX_WAITING,
    )
    jobs: list[str] = []
    try:
        yield jobs
    finally:
        for job_id in jobs:
            cancel_job(job_id)
        configure(redis_url=TEST_REDIS_URL, result_backend_url=TEST_REDIS_URL)


def tenant_name() -> str:
    return f"svc-{uuid.uuid4().hex[:8]}"


def enqueue(jobs: list[str], tenant: str, **options: object) -> str:
    job_id = enqueue_remix(
        prompt=unique_prompt("api-tenants"), tenant=tenant, **REMIX_INPUT, **options
    )  # type: ignore[arg-type]
    jobs.append(job_id)
    return job_id


def written(client: redis.Redis) -> tuple[int, int, int]:
    """Job records, blobs and submit messages."""
    records = len(list(client.scan_iter(keys.JOB_PREFIX + "*")))
    return records, len(list(client.scan_iter(keys.blob("*")))), int(client.llen("submit"))


def test_the_record_carries_the_tenant_and_the_priority(limited: list[str]) -> None:
    tenant = tenant_name()

    record = get_job(enqueue(limited, tenant, priority="interactive"))

    assert record is not None and (record.tenant, record.priority) == (tenant, "interactive")


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"tenant": "svc a"}, "invalid request: tenant: must be 1 to 64"),
        ({"tenant": ""}, "invalid request: tenant: must be 1 to 64"),
        ({"priority": "urgent"}, "invalid request: priority: must be one of"),
        ({"priority": None}, "invalid request: priority: must be one of"),
    ],
)
def test_a_bad_tenant_or_priority_is_a_one_line_value_error_and_nothing_is_written(
    limited: list[str], redis_client: redis.Redis, options: dict[str, object], named: str
) -> None:
    before = written(redis_client)

    with pytest.raises(ValueError, match=named) as caught:
        enqueue_remix(prompt="x", image_file=IMAGE, **{**REMIX_INPUT, "image_url": None, **options})  # type: ignore[arg-type]

    assert "\n" not in str(caught.value)
    assert written(redis_client) == before


def test_queue_full_writes_nothing_and_another_tenant_goes_on(
    limited: list[str], redis_client: redis.Redis
) -> None:
    tenant = tenant_name()
    for _ in range(MAX_WAITING):
        enqueue(limited, tenant, priority="bulk")
    before = written(redis_client)

    with pytest.raises(QueueFull) as caught:
        enqueue_remix(
            prompt="full",
            image_file=IMAGE,
            reference_image_urls=REMIX_INPUT["reference_image_urls"],  # type: ignore[arg-type]
            tenant=tenant,
            idempotency_key="full-key",
        )

    assert str(caught.value).count("\n") == 0 and tenant in str(caught.value)
    assert (caught.value.waiting, caught.value.limit) == (MAX_WAITING, MAX_WAITING)
    assert written(redis_client) == before  # no record, no stored image, no message
    assert redis_client.get(keys.idempotency("full-key", tenant)) is None
    assert get_job(enqueue(limited, tenant_name())) is not None
