"""The job store's indexes and cancel: real Redis, the sandbox over HTTP, no worker.

The per-state index must follow every state change (so a listing never shows a job under
a state it left), the task index must name the job of every accepted task, and cancel
must be decided by the same record fields as a submit's attempt, atomically.
"""

from __future__ import annotations

import threading

import pytest

from sandbox.server import SandboxServer
from tests.policy_kit import accepted, new_job, sent, submit_now
from worker import keys
from worker.models import JobState
from worker.policies.poll import poll_step
from worker.services import Services

pytestmark = pytest.mark.policy


def _members(svc: Services, state: str) -> set[str]:
    return {m.decode() for m in svc.store.redis.zrange(keys.state_index(state), 0, -1)}


def _where(svc: Services, job_id: str) -> list[str]:
    return [state for state in keys.STATES if job_id in _members(svc, state)]


def test_the_state_index_follows_a_job_through_its_life(
    svc: Services, upstream: SandboxServer
) -> None:
    job_id, _ = new_job(svc)
    assert _where(svc, job_id) == ["queued"]

    assert submit_now(svc, job_id) == "accepted"
    assert _where(svc, job_id) == ["submitted"]

    svc.store.update(job_id, JobState.RUNNING)
    assert _where(svc, job_id) == ["running"]

    svc.store.finish(job_id, JobState.FAILED, fail_code="x", fail_msg="y")
    assert _where(svc, job_id) == ["failed"]
    assert svc.store.count_by_state()["failed"] == 1


def test_a_finished_job_is_published_once(svc: Services) -> None:
    job_id, _ = new_job(svc)
    pubsub = svc.store.redis.pubsub()
    pubsub.subscribe(svc.store.finished_channel)
    pubsub.get_message(timeout=1)  # the subscription's confirmation

    assert svc.store.finish(job_id, JobState.FAILED, fail_code="x", fail_msg="y")
    assert not svc.store.finish(job_id, JobState.SUCCEEDED)

    message = pubsub.get_message(timeout=1)
    assert message is not None and message["data"] == job_id.encode()
    assert pubsub.get_message(timeout=0.2) is None
    pubsub.close()


def test_pages_cover_every_job_of_a_state_once_in_creation_order(svc: Services) -> None:
    created = [new_job(svc)[0] for _ in range(23)]
    moved = created[5]
    svc.store.finish(moved, JobState.FAILED, fail_code="x", fail_msg="y")

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page, cursor = svc.store.list_by_state(JobState.QUEUED, 5, cursor)
        assert len(page) <= 5 and all(r.state is JobState.QUEUED for r in page)
        seen += [r.job_id for r in page]
        pages += 1
        if cursor is None:
            break
    assert seen == [job_id for job_id in created if job_id != moved]
    assert pages in (5, 6)  # 22 jobs: five pages, perhaps an empty sixth


def test_an_expired_record_leaves_the_index_when_a_page_meets_it(svc: Services) -> None:
    gone, _ = new_job(svc)
    kept, _ = new_job(svc)
    svc.store.redis.delete(keys.job(gone))  # as if its TTL ran out

    page, _ = svc.store.list_by_state(JobState.QUEUED, 10)

    assert [r.job_id for r in page] == [kept]
    assert _members(svc, "queued") == {kept}


def test_an_accepted_task_names_its_job(svc: Services, upstream: SandboxServer) -> None:
    job_id, _ = new_job(svc)
    submit_now(svc, job_id)
    task_id = svc.store.get(job_id).upstream_task_id  # type: ignore[union-attr]

    assert task_id and svc.store.job_for_task(task_id) == job_id
    assert svc.store.job_for_task("no-such-task") is None


def test_cancel_before_sending_means_it_is_never_sent(
    svc: Services, upstream: SandboxServer
) -> None:
    job_id, prompt = new_job(svc)

    assert svc.store.cancel(job_id) == "cancelled"
    assert svc.store.cancel(job_id) == "already"

    assert submit_now(svc, job_id) == "finished"
    record = svc.store.get(job_id)
    assert record is not None and record.state is JobState.CANCELLED
    assert record.fail_code == "cancelled" and record.finished_at is not None
    assert svc.store.scheduled(job_id) is None and _where(svc, job_id) == ["cancelled"]
    assert sent(upstream, prompt) == 0


def test_cancel_is_refused_once_accepted_or_finished(
    svc: Services, upstream: SandboxServer
) -> None:
    job_id, _ = new_job(svc)
    submit_now(svc, job_id)
    assert svc.store.cancel(job_id) == "accepted"

    other, _ = new_job(svc)
    svc.store.finish(other, JobState.FAILED, fail_code="x", fail_msg="y")
    assert svc.store.cancel(other) == "finished"
    assert svc.store.cancel("no-such-job") == "missing"
    assert svc.store.get(job_id).state is JobState.SUBMITTED  # type: ignore[union-attr]


def test_cancel_is_refused_while_a_create_task_is_under_way(
    svc: Services, upstream: SandboxServer
) -> None:
    """The submit claim decides: once its attempt is open, cancel answers ``sending``."""
    upstream.configure(slow_rate=1.0, slow_seconds=1.0, fault_endpoints=["createTask"])
    job_id, prompt = new_job(svc)
    outcome: list[str] = []
    submit = threading.Thread(target=lambda: outcome.append(submit_now(svc, job_id)))
    submit.start()
    for _ in range(100):
        if svc.store.get(job_id).attempt_started_at is not None:  # type: ignore[union-attr]
            break
        threading.Event().wait(0.01)

    assert svc.store.cancel(job_id) == "sending"
    submit.join(10)
    assert outcome == ["accepted"] and accepted(upstream, prompt) == 1
    assert svc.store.get(job_id).state is JobState.SUBMITTED  # type: ignore[union-attr]


def test_cancel_and_submit_racing_never_both_win(svc: Services, upstream: SandboxServer) -> None:
    """Many races: either the job is cancelled and never sent, or sent and not cancelled."""
    for _ in range(20):
        job_id, prompt = new_job(svc)
        results = _race_submit_and_cancel(svc, job_id)
        if results["cancel"] == "cancelled":
            assert results["submit"] in ("finished", "line") and sent(upstream, prompt) == 0
        else:
            assert results["cancel"] in ("sending", "accepted")
            assert results["submit"] == "accepted" and accepted(upstream, prompt) == 1


def _race_submit_and_cancel(svc: Services, job_id: str) -> dict[str, str]:
    results: dict[str, str] = {}
    racers = [
        threading.Thread(target=lambda: results.update(submit=submit_now(svc, job_id))),
        threading.Thread(target=lambda: results.update(cancel=svc.store.cancel(job_id))),
    ]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(10)
    return results


def test_cancel_is_refused_after_an_unknown_outcome(svc: Services, upstream: SandboxServer) -> None:
    """The upstream may hold a task for the job: cancelling would hide a charge."""
    upstream.configure(cut_rate=1.0, fault_endpoints=["createTask"])
    job_id, _ = new_job(svc)

    submit_now(svc, job_id)

    record = svc.store.get(job_id)
    assert record is not None and record.unknown_outcomes == 1
    assert svc.store.cancel(job_id) == "unknown_outcome"


def test_a_poll_of_a_cancelled_job_does_nothing(svc: Services) -> None:
    job_id, _ = new_job(svc)
    svc.store.cancel(job_id)
    assert poll_step(svc, job_id, 0) == "finished"


def test_pruning_forgets_only_index_entries_older_than_a_record_can_live(
    svc: Services,
) -> None:
    recent, _ = new_job(svc)
    ancient, _ = new_job(svc)
    svc.store.redis.zadd(keys.state_index("queued"), {ancient: svc.clock.now() - 7200})

    assert svc.store.prune_indexes(3600) == 1

    assert _members(svc, "queued") == {recent}
