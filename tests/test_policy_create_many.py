"""``JobStore.create_many`` (``POST /v1/jobs:batch``) against real Redis: all jobs or none."""

from __future__ import annotations

import uuid

import pytest

from tests.policy_kit import INPUT
from worker import keys
from worker.models import JobState
from worker.services import Services
from worker.store.jobs import NewJob


def _jobs(count: int, key_prefix: str | None = None) -> list[NewJob]:
    return [
        NewJob(
            uuid.uuid4().hex,
            {"prompt": f"batch {i}", **INPUT},
            None if key_prefix is None else f"{key_prefix}-{i}",
        )
        for i in range(count)
    ]


def test_every_job_is_created_queued_and_scheduled(svc: Services) -> None:
    jobs = _jobs(3)

    owners = svc.store.create_many(jobs, due_in=30)

    assert owners == [(job.job_id, True) for job in jobs]
    records = svc.store.get_many([job.job_id for job in jobs])
    assert all(r is not None and r.state is JobState.QUEUED for r in records)
    assert all(svc.store.scheduled(job.job_id) is not None for job in jobs)
    assert svc.store.count_by_state()["queued"] == 3


def test_a_check_that_raises_writes_nothing(svc: Services) -> None:
    jobs = _jobs(3, key_prefix=f"k-{uuid.uuid4().hex}")
    seen: list[list[str | None]] = []

    def refuse(owners: list[str | None]) -> None:
        seen.append(owners)
        raise LookupError("conflict")

    with pytest.raises(LookupError):
        svc.store.create_many(jobs, due_in=30, check=refuse)

    assert seen == [[None, None, None]]
    assert svc.store.get_many([job.job_id for job in jobs]) == [None, None, None]
    assert not any(svc.store.redis.exists(keys.idempotency(j.idempotency_key or "")) for j in jobs)


def test_a_key_taken_meanwhile_is_seen_on_the_retry(svc: Services) -> None:
    prefix = f"k-{uuid.uuid4().hex}"
    jobs = _jobs(2, key_prefix=prefix)
    other_id = uuid.uuid4().hex
    calls: list[list[str | None]] = []

    def race(owners: list[str | None]) -> None:
        calls.append(owners)
        if len(calls) == 1:  # another producer takes the second key between read and write
            svc.store.create(
                other_id, {"prompt": "other", **INPUT}, due_in=30, idempotency_key=f"{prefix}-1"
            )

    owners = svc.store.create_many(jobs, due_in=30, check=race)

    assert calls == [[None, None], [None, other_id]]
    assert owners == [(jobs[0].job_id, True), (other_id, False)]
    assert svc.store.get(jobs[1].job_id) is None


def test_the_same_key_twice_in_one_batch_names_one_job(svc: Services) -> None:
    key = f"k-{uuid.uuid4().hex}"
    first, second = _jobs(2)
    jobs = [
        NewJob(first.job_id, first.request, key),
        NewJob(second.job_id, first.request, key),
    ]

    owners = svc.store.create_many(jobs, due_in=30)

    assert owners == [(first.job_id, True), (first.job_id, False)]


def test_a_batch_is_indexed_and_scheduled_in_its_order(svc: Services) -> None:
    """One script writes the whole batch at one moment: each job still gets its own
    creation time, so every index (and the schedule) lists them in the order given."""
    jobs = _jobs(50)

    svc.store.create_many(jobs, due_in=30)

    ids = [job.job_id for job in jobs]
    records = svc.store.get_many(ids)
    times = [record.created_at for record in records if record is not None]
    assert times == sorted(times) and len(set(times)) == len(ids)
    listed, _ = svc.store.list_by_state(JobState.QUEUED, 100)
    assert [record.job_id for record in listed] == ids
    scheduled = [m.decode() for m in svc.store.redis.zrange(keys.SCHEDULE, 0, -1)]
    assert scheduled == ids
