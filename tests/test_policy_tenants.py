"""Tenants and priorities in the job store: real Redis, the sandbox over HTTP, no worker.

Each job's record carries its tenant and priority; each tenant has its own idempotency
keys and state indexes; the waiting counts follow every job into and out of ``queued``,
and ``REMIX_TENANT_MAX_WAITING`` refuses a create atomically (nothing written).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest

from sandbox.server import SandboxServer
from tests.policy_kit import INPUT, make_services, submit_now
from worker import keys
from worker.models import JobState
from worker.services import Services
from worker.store.jobs import NewJob, QueueFull

pytestmark = pytest.mark.policy
LIMIT = 3


@pytest.fixture
def limited(policy_redis: object, upstream: SandboxServer) -> Iterator[Services]:
    """Services whose tenants may each have :data:`LIMIT` jobs waiting."""
    yield make_services(upstream.url, remix_tenant_max_waiting=LIMIT)


def create(
    svc: Services, tenant: str = "default", priority: str = "normal", **options: object
) -> str:
    job_id = uuid.uuid4().hex
    request = {"prompt": f"tenants {job_id[:8]}", **INPUT}
    owner, created = svc.store.create(
        job_id,
        request,
        due_in=60,
        tenant=tenant,
        priority=priority,
        **options,  # type: ignore[arg-type]
    )
    assert created
    return owner


def new_jobs(count: int, tenant: str, priority: str = "normal") -> list[NewJob]:
    return [
        NewJob(
            uuid.uuid4().hex, {"prompt": f"batch {i}", **INPUT}, tenant=tenant, priority=priority
        )
        for i in range(count)
    ]


def listed(svc: Services, tenant: str, state: JobState) -> list[str]:
    records, _ = svc.store.list_by_state(state, 100, tenant=tenant)
    return [record.job_id for record in records]


def key_count(svc: Services) -> int:
    return int(svc.store.redis.dbsize())


# ------------------------------------------------------------------ the record


def test_the_record_carries_its_tenant_and_priority(svc: Services) -> None:
    job_id = create(svc, tenant="svc-a", priority="interactive")

    record = svc.store.get(job_id)

    assert record is not None
    assert (record.tenant, record.priority) == ("svc-a", "interactive")
    dumped = record.model_dump(mode="json")
    assert dumped["tenant"] == "svc-a" and dumped["priority"] == "interactive"


def test_a_record_written_before_tenants_reads_as_default_and_normal(svc: Services) -> None:
    job_id = create(svc, tenant="svc-a", priority="bulk")
    svc.store.redis.hdel(keys.job(job_id), "tenant", "priority")

    record = svc.store.get(job_id)

    assert record is not None and (record.tenant, record.priority) == ("default", "normal")


@pytest.mark.parametrize(
    ("tenant", "priority", "named"),
    [
        ("svc a", "normal", "tenant"),
        ("x" * 65, "normal", "tenant"),
        ("", "normal", "tenant"),
        ("a:b", "normal", "tenant"),
        ("svc-a", "urgent", "priority"),
        ("svc-a", "", "priority"),
    ],
)
def test_a_bad_tenant_or_priority_writes_nothing(
    svc: Services, tenant: str, priority: str, named: str
) -> None:
    before = key_count(svc)

    with pytest.raises(ValueError, match=f"^{named}: ") as caught:
        create(svc, tenant=tenant, priority=priority)

    assert "\n" not in str(caught.value)
    assert key_count(svc) == before


# ------------------------------------------------------------------ idempotency, listing


def test_idempotency_keys_are_per_tenant(svc: Services) -> None:
    request = {"prompt": "same request", **INPUT}
    owners = [
        svc.store.create(uuid.uuid4().hex, request, due_in=60, idempotency_key="k-1", tenant=t)
        for t in ("svc-a", "svc-b", "svc-a", "default")
    ]

    (a, a_new), (b, b_new), (a_again, again_new), (d, d_new) = owners
    assert a_new and b_new and d_new and not again_new
    assert a_again == a and len({a, b, d}) == 3
    # The default tenant's keys are where they were before tenants existed.
    assert svc.store.redis.get("remixq:idem:k-1") == d.encode()
    assert svc.store.idempotency_owner("k-1", "svc-b") == b


def test_a_batch_finds_keys_in_its_own_tenant_only(svc: Services) -> None:
    a = create(svc, tenant="svc-a", idempotency_key="order-7")
    jobs = [NewJob(uuid.uuid4().hex, {"prompt": "b", **INPUT}, "order-7", tenant="svc-b")]
    seen: list[list[str | None]] = []

    owners = svc.store.create_many(jobs, due_in=60, check=seen.append)

    assert seen == [[None]]
    assert owners == [(jobs[0].job_id, True)] and jobs[0].job_id != a


def test_each_tenant_lists_only_its_own_jobs_as_they_move(
    svc: Services, upstream: SandboxServer
) -> None:
    a1, a2 = create(svc, tenant="svc-a"), create(svc, tenant="svc-a", priority="bulk")
    b1 = create(svc, tenant="svc-b")
    svc.store.update(b1, due_in=0.0)

    assert listed(svc, "svc-a", JobState.QUEUED) == [a1, a2]
    assert listed(svc, "svc-b", JobState.QUEUED) == [b1]
    assert listed(svc, "default", JobState.QUEUED) == []

    assert svc.store.cancel(a1) == "cancelled"
    assert submit_now(svc, b1) == "accepted"
    svc.store.finish(a2, JobState.FAILED, fail_code="x", fail_msg="y")

    assert listed(svc, "svc-a", JobState.QUEUED) == []
    assert listed(svc, "svc-a", JobState.CANCELLED) == [a1]
    assert listed(svc, "svc-a", JobState.FAILED) == [a2]
    assert listed(svc, "svc-b", JobState.SUBMITTED) == [b1]
    assert listed(svc, "svc-b", JobState.CANCELLED) == []
    everyone, _ = svc.store.list_by_state(JobState.CANCELLED, 100)
    assert [r.job_id for r in everyone] == [a1]


def test_a_tenants_listing_pages_with_a_cursor(svc: Services) -> None:
    mine = [create(svc, tenant="svc-a") for _ in range(5)]
    for _ in range(5):
        create(svc, tenant="svc-b")

    first, cursor = svc.store.list_by_state(JobState.QUEUED, 2, tenant="svc-a")
    second, cursor = svc.store.list_by_state(JobState.QUEUED, 2, cursor, tenant="svc-a")
    third, end = svc.store.list_by_state(JobState.QUEUED, 2, cursor, tenant="svc-a")

    assert [r.job_id for r in first + second + third] == mine and end is None


def test_pruning_reaches_the_tenants_indexes(svc: Services) -> None:
    job_id = create(svc, tenant="svc-a")
    svc.store.redis.delete(keys.job(job_id))  # as if its record had expired

    assert svc.store.prune_indexes(older_than_s=-60) >= 2

    assert svc.store.redis.zcard(keys.tenant_state_index("svc-a", "queued")) == 0


# ------------------------------------------------------------------ waiting counts


def test_waiting_counts_follow_every_way_out_of_queued(
    svc: Services, upstream: SandboxServer
) -> None:
    accepted, cancelled = create(svc, "svc-a"), create(svc, "svc-a", "interactive")
    failed, stays = create(svc, "svc-b", "bulk"), create(svc, "svc-b", "bulk")
    assert svc.store.waiting_counts() == {
        ("svc-a", "normal"): 1,
        ("svc-a", "interactive"): 1,
        ("svc-b", "bulk"): 2,
    }

    svc.store.update(accepted, due_in=0.0)
    assert submit_now(svc, accepted) == "accepted"
    svc.store.update(accepted, JobState.RUNNING)  # later moves take nothing more away
    assert svc.store.cancel(cancelled) == "cancelled"
    svc.store.finish(failed, JobState.FAILED, fail_code="timeout", fail_msg="late")
    svc.store.finish(failed, JobState.FAILED, fail_code="timeout", fail_msg="again")

    assert svc.store.waiting_counts() == {("svc-b", "bulk"): 1}
    assert svc.store.get(stays) is not None
    assert svc.store.redis.hkeys(keys.WAITING) == [b"svc-b:bulk"]  # no zero left behind


def test_a_job_written_before_tenants_leaves_queued_without_taking_a_count(svc: Services) -> None:
    old, new = create(svc, "default"), create(svc, "default")
    svc.store.redis.hdel(keys.job(old), "_waiting", "_tenant_index")
    svc.store.redis.hset(keys.WAITING, "default:normal", 1)  # only the new one was counted

    svc.store.finish(old, JobState.FAILED, fail_code="x", fail_msg="y")

    assert svc.store.waiting_counts() == {("default", "normal"): 1}
    assert svc.store.get(new) is not None


# ------------------------------------------------------------------ admission control


def test_a_tenant_at_its_limit_is_refused_and_nothing_is_written(limited: Services) -> None:
    for _ in range(LIMIT):
        create(limited, "svc-a", "bulk")
    before = key_count(limited)
    counts = limited.store.waiting_counts()

    with pytest.raises(QueueFull) as caught:
        create(limited, "svc-a", "interactive", idempotency_key="full-1")

    message = str(caught.value)
    assert "\n" not in message and "svc-a" in message and "REMIX_TENANT_MAX_WAITING" in message
    assert (caught.value.waiting, caught.value.limit, caught.value.adding) == (LIMIT, LIMIT, 1)
    assert key_count(limited) == before and limited.store.waiting_counts() == counts
    assert limited.store.idempotency_owner("full-1", "svc-a") is None


def test_another_tenant_is_not_affected(limited: Services) -> None:
    for _ in range(LIMIT):
        create(limited, "svc-a")

    other = create(limited, "svc-b", "interactive")

    assert limited.store.get(other) is not None
    with pytest.raises(QueueFull):
        create(limited, "svc-a")


def test_a_batch_that_would_pass_the_limit_writes_none_of_its_jobs(limited: Services) -> None:
    create(limited, "svc-a")
    before = key_count(limited)

    with pytest.raises(QueueFull) as caught:
        limited.store.create_many(new_jobs(LIMIT, "svc-a"), due_in=60)

    assert (caught.value.waiting, caught.value.adding, caught.value.excess) == (1, LIMIT, 1)
    assert key_count(limited) == before
    fits = limited.store.create_many(new_jobs(LIMIT - 1, "svc-a"), due_in=60)
    assert all(created for _, created in fits)


def test_a_repeat_of_an_idempotency_key_is_answered_at_the_limit(limited: Services) -> None:
    first = create(limited, "svc-a", idempotency_key="again")
    for _ in range(LIMIT - 1):
        create(limited, "svc-a")

    owner, created = limited.store.create(
        uuid.uuid4().hex,
        {"prompt": "x", **INPUT},
        due_in=60,
        idempotency_key="again",
        tenant="svc-a",
    )

    assert (owner, created) == (first, False)


def test_room_comes_back_as_jobs_leave_queued(limited: Services) -> None:
    jobs = [create(limited, "svc-a") for _ in range(LIMIT)]
    with pytest.raises(QueueFull):
        create(limited, "svc-a")

    assert limited.store.cancel(jobs[0]) == "cancelled"

    assert limited.store.get(create(limited, "svc-a")) is not None


def test_a_record_failed_at_once_may_pass_the_limit(limited: Services) -> None:
    for _ in range(LIMIT):
        create(limited, "svc-a")

    job_id = create(limited, "svc-a", admit=False)

    assert limited.store.finish(job_id, JobState.FAILED, fail_code="x", fail_msg="y")
    assert sum(limited.store.waiting_counts().values()) == LIMIT


def test_the_new_record_holds_where_its_count_is(svc: Services) -> None:
    job_id = create(svc, "svc-a", "bulk")

    raw = svc.store.redis.hmget(keys.job(job_id), ["_waiting", "_tenant_index"])

    assert [json.loads(v) for v in raw] == [
        keys.waiting_field("svc-a", "bulk"),
        keys.tenant_index_prefix("svc-a"),
    ]
