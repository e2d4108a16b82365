"""The poll policy, the schedule and the dispatcher, step by step: real Redis and the sandbox."""

from __future__ import annotations

import time

import pytest
import redis
from celery import Celery

from sandbox.server import SandboxServer
from tests.policy_kit import (
    API_KEY,
    accepted,
    give_moment,
    make_services,
    new_job,
    submit_now,
    token_of,
)
from worker import keys
from worker.fleet.dispatcher import POLL_BATCH_SIZE, Dispatcher
from worker.models import JobState
from worker.policies.poll import poll_step
from worker.policies.submit import submit_step
from worker.services import Services
from worker.store.clock import server_time

pytestmark = pytest.mark.policy


def _accepted_job(svc: Services, prompt: str | None = None) -> str:
    job_id, _ = new_job(svc, prompt)
    assert submit_now(svc, job_id) == "accepted"
    return job_id


def _poll(svc: Services, job_id: str) -> str:
    return poll_step(svc, job_id, token_of(svc, job_id))


def test_polls_until_success_and_leaves_the_schedule(
    svc: Services, upstream: SandboxServer
) -> None:
    job_id = _accepted_job(svc)
    assert _poll(svc, job_id) == "pending"
    time.sleep(0.6)  # the sandbox's generation time

    assert _poll(svc, job_id) == "succeeded"
    record = svc.store.get(job_id)
    assert record is not None and record.state is JobState.SUCCEEDED and record.result_urls
    assert record.polls == 2
    assert svc.store.scheduled(job_id) is None


def test_the_deadline_poll_asks_once_more_before_declaring_a_timeout(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    """The job finished upstream in its last interval: it succeeded, it did not time out."""
    svc = make_services(upstream.url, remix_deadline_s=5.0, kie_request_deadline_s=2.0)
    job_id = _accepted_job(svc)
    time.sleep(0.6)
    svc.store.redis.hset(keys.job(job_id), "submitted_at", str(svc.clock.now() - 60))

    assert _poll(svc, job_id) == "succeeded"


def test_a_job_unfinished_at_its_deadline_times_out_after_asking(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = make_services(upstream.url, remix_deadline_s=5.0, kie_request_deadline_s=2.0)
    job_id = _accepted_job(svc, "[sandbox:seconds=60] slow")
    svc.store.redis.hset(keys.job(job_id), "submitted_at", str(svc.clock.now() - 60))
    polls_before = upstream.stats()["record_requests"]

    assert _poll(svc, job_id) == "timeout"
    assert upstream.stats()["record_requests"] == polls_before + 1
    assert svc.store.get(job_id).fail_code == "timeout"  # type: ignore[union-attr]


@pytest.mark.parametrize("trouble", ["wrong_key", "maintenance", "server_error", "cut"])
def test_no_record_info_error_fails_a_paid_job(
    policy_redis: redis.Redis, upstream: SandboxServer, trouble: str
) -> None:
    svc = make_services(upstream.url)
    job_id = _accepted_job(svc)
    if trouble == "wrong_key":
        upstream.configure(api_key="sk-rotated")  # 401 for every recordInfo
    elif trouble == "maintenance":
        upstream.configure(maintenance=True)
    elif trouble == "server_error":
        upstream.configure(faults={500: 1.0}, fault_endpoints=["recordInfo"])
    else:
        upstream.configure(cut_rate=1.0, fault_endpoints=["recordInfo"])

    for _ in range(3):
        assert _poll(svc, job_id) == "poll_error"
    record = svc.store.get(job_id)
    assert record is not None and record.state is JobState.SUBMITTED and record.polls == 3

    upstream.configure(api_key=API_KEY, maintenance=False, faults={}, cut_rate=0.0)
    time.sleep(0.6)
    assert _poll(svc, job_id) == "succeeded"


def test_a_job_whose_record_info_is_unknown_upstream_times_out_with_the_last_error(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = make_services(upstream.url, remix_deadline_s=5.0, kie_request_deadline_s=2.0)
    job_id = _accepted_job(svc)
    upstream.reset()  # the sandbox forgets the task: recordInfo answers 404
    assert _poll(svc, job_id) == "poll_error"
    svc.store.redis.hset(keys.job(job_id), "submitted_at", str(svc.clock.now() - 60))

    assert _poll(svc, job_id) == "timeout"
    record = svc.store.get(job_id)
    assert record is not None and "404" in (record.fail_msg or "")


def test_counters_and_fields_of_a_finished_job_do_not_change(svc: Services) -> None:
    job_id = _accepted_job(svc)
    assert svc.store.finish(job_id, JobState.FAILED, fail_code="x", fail_msg="y")
    before = svc.store.get(job_id)

    assert svc.store.increment(job_id, "polls") is None
    assert svc.store.update(job_id, JobState.RUNNING) == 0
    assert _poll(svc, job_id) == "finished"
    assert svc.store.get(job_id) == before


def test_writes_renew_the_life_of_a_record(svc: Services) -> None:
    job_id = _accepted_job(svc)
    svc.store.redis.expire(keys.job(job_id), 5)
    svc.store.increment(job_id, "polls")
    assert svc.store.redis.ttl(keys.job(job_id)) > 5
    svc.store.redis.expire(keys.job(job_id), 5)
    assert _poll(svc, job_id) == "pending"
    assert svc.store.redis.ttl(keys.job(job_id)) > 5


def test_a_scheduled_job_without_a_record_is_dropped_without_a_trace(svc: Services) -> None:
    svc.store.redis.zadd(keys.SCHEDULE, {"ghost": 0})
    assert svc.store.claim_due(10, 30) == []
    assert svc.store.scheduled("ghost") is None
    assert not svc.store.redis.exists(keys.job("ghost"))
    assert poll_step(svc, "ghost", 1) == "missing"
    assert not svc.store.redis.exists(keys.job("ghost"))


def test_claiming_hands_out_tokens_and_a_lease(svc: Services) -> None:
    job_id, _ = new_job(svc)
    svc.store.update(job_id, due_in=0)
    (claimed,) = svc.store.claim_due(10, 30)
    assert (claimed.job_id, claimed.token, claimed.phase) == (job_id, 1, "submit")
    assert claimed.request["prompt"]
    assert svc.store.claim_due(10, 30) == []  # leased, not due again
    due = svc.store.scheduled(job_id)
    # The lease runs on the server's clock (claim_due.lua reads TIME), so it is read there:
    # the client's estimate of that clock can trail it, which would stretch the lease.
    assert due is not None and 29 < due - server_time(svc.store.redis) <= 30


class _Recorder:
    """Stands in for the publisher: notes what would be sent, or refuses like a dead broker."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.submits: list[tuple[str, int]] = []
        self.polls: list[list[tuple[str, int, float]]] = []

    def producer(self):  # type: ignore[no-untyped-def]
        import contextlib

        return contextlib.nullcontext()

    batch = producer

    def flush_events(self, **_: object) -> None:
        pass

    def submit(self, job_id: str, request: object, token: int, **_: object) -> None:
        if self.broken:
            raise ConnectionRefusedError("broker down")
        self.submits.append((job_id, token))

    def poll(self, jobs: list[tuple[str, int, float]], **_: object) -> None:
        if self.broken:
            raise ConnectionRefusedError("broker down")
        self.polls.append(list(jobs))


def test_the_dispatcher_batches_due_polls_and_sends_submits_one_by_one(svc: Services) -> None:
    polling = [_accepted_job(svc) for _ in range(POLL_BATCH_SIZE + 3)]
    for job_id in polling:
        svc.store.update(job_id, due_in=0)
    queued = [new_job(svc)[0] for _ in range(2)]
    recorder = _Recorder()
    svc.publisher = recorder  # type: ignore[assignment]

    assert Dispatcher(svc).tick() == len(polling) + len(queued)

    assert sorted(j for j, _ in recorder.submits) == sorted(queued)
    assert [len(batch) for batch in recorder.polls] == [POLL_BATCH_SIZE, 3]
    assert sorted(j for batch in recorder.polls for j, _, _ in batch) == sorted(polling)
    assert Dispatcher(svc).tick() == 0


def test_a_job_due_in_the_past_is_sent_on_the_next_round(svc: Services) -> None:
    """A late join (a clock step, a slow write) is just a job that is already due."""
    job_id = _accepted_job(svc)
    svc.store.redis.zadd(keys.SCHEDULE, {job_id: 1.0})  # due in 1970
    recorder = _Recorder()
    svc.publisher = recorder  # type: ignore[assignment]
    assert Dispatcher(svc).tick() == 1
    assert recorder.polls[0][0][0] == job_id


def test_a_broker_that_refuses_fails_no_job_and_leaves_them_due(svc: Services) -> None:
    accepted_id = _accepted_job(svc)
    svc.store.update(accepted_id, due_in=0)
    queued, _ = new_job(svc)
    svc.publisher = _Recorder(broken=True)  # type: ignore[assignment]

    with pytest.raises(ConnectionRefusedError):
        Dispatcher(svc).tick()

    now = svc.clock.now()
    for job_id in (accepted_id, queued):
        due = svc.store.scheduled(job_id)
        assert due is not None and due <= now + 0.1, "made due again, not left for the lease"
        assert not svc.store.get(job_id).finished  # type: ignore[union-attr]


def test_enqueue_with_the_broker_down_queues_the_job_durably(
    policy_redis: redis.Redis, upstream: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker is away but the job store answers: the call succeeds, the job waits in
    its line (no message is sent before a send moment picks it)."""
    from producers import api as producer_api

    svc = make_services(upstream.url)
    svc.publisher.app = Celery("dead-broker", broker="redis://127.0.0.1:9/0", set_as_current=False)
    svc.publisher.app.conf.broker_connection_timeout = 0.5
    monkeypatch.setattr(producer_api, "services", lambda: svc)

    job_id = producer_api.enqueue_remix(
        prompt="broker down",
        image_url="https://e.test/a.png",
        reference_image_urls=["https://e.test/b.png"],
    )

    assert svc.store.get(job_id) is not None
    assert svc.lines.waiting(["kie"]) == {"kie": 1}
    assert svc.store.scheduled(job_id) is not None  # the backstop at its submit deadline


def test_enqueue_with_the_job_store_down_raises_and_writes_nothing(
    policy_redis: redis.Redis, upstream: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from producers import api as producer_api

    svc = make_services(
        upstream.url, redis_url="redis://127.0.0.1:9/0", result_backend_url="redis://127.0.0.1:9/0"
    )
    monkeypatch.setattr(producer_api, "services", lambda: svc)
    with pytest.raises(redis.ConnectionError):
        producer_api.enqueue_remix(
            prompt="store down",
            image_url="https://e.test/a.png",
            reference_image_urls=["https://e.test/b.png"],
        )
    assert policy_redis.dbsize() == 0


def test_the_upstream_accepts_each_job_once_across_steps(
    svc: Services, upstream: SandboxServer
) -> None:
    job_id, prompt = new_job(svc)
    assert submit_now(svc, job_id) == "accepted"
    # A duplicate of the first message and a re-dispatch both arrive later.
    assert submit_now(svc, job_id) == "has_task"
    svc.store.update(job_id, due_in=0)
    (claimed,) = svc.store.claim_due(10, 30)
    assert claimed.phase == "poll"
    assert submit_step(svc, job_id, claimed.token) == "has_task"
    assert accepted(upstream, prompt) == 1


def handed_out(svc: Services) -> str:
    """A new job picked for a send moment (its message is on its way), due again now."""
    job_id, _ = new_job(svc)
    assert give_moment(svc) == [job_id]
    svc.store.update(job_id, due_in=0)
    return job_id


def _oldest_waiting(svc: Services, seconds_ago: float) -> float:
    """The send time of the oldest message waiting in a queue, ``seconds_ago``."""
    return svc.clock.now() - seconds_ago


def test_a_job_whose_message_waits_in_a_backlog_is_not_sent_again(svc: Services) -> None:
    """Its lease ran out while its message still waits in a long queue: no second copy."""
    job_id = handed_out(svc)  # due at once, as if its message had been waiting a lease
    waiting_since = _oldest_waiting(svc, 60)  # the queue's head was sent before this job

    assert svc.store.claim_due(10, 30, oldest_waiting={"submit": waiting_since}) == []
    due = svc.store.scheduled(job_id)
    assert due is not None and due > svc.clock.now() + 29
    assert token_of(svc, job_id) == 1  # the waiting message is still the one that counts


def test_a_lost_message_is_sent_again_although_newer_ones_wait(svc: Services) -> None:
    """Every message still waiting was sent after the job's: the job's message is gone."""
    job_id = handed_out(svc)
    waiting_since = svc.clock.now() + 10  # the queue's head is younger than the job's dispatch

    (claimed,) = svc.store.claim_due(10, 30, oldest_waiting={"submit": waiting_since})
    assert (claimed.job_id, claimed.token, claimed.resent) == (job_id, 2, True)


def test_a_job_made_due_by_its_own_step_is_sent_despite_a_backlog(svc: Services) -> None:
    """A poll batch out of time makes its remaining jobs due: no message of theirs waits."""
    from worker.tasks import _due_again

    job_id = _accepted_job(svc)
    svc.store.update(job_id, due_in=0)
    (claimed,) = svc.store.claim_due(10, 30)
    _due_again(svc, [[job_id, claimed.token, claimed.due]])

    (again,) = svc.store.claim_due(10, 30, oldest_waiting={"poll": _oldest_waiting(svc, 60)})
    assert again.job_id == job_id and not again.resent


def test_a_job_whose_send_failed_is_sent_despite_a_backlog(svc: Services) -> None:
    """The broker refused the job's message; a backlog of others must not hold it back."""
    job_id, _ = new_job(svc)
    svc.store.due_now([job_id])

    (claimed,) = svc.store.claim_due(10, 30, oldest_waiting={"submit": _oldest_waiting(svc, 60)})
    assert claimed.job_id == job_id


def test_a_job_whose_message_was_lost_is_sent_again_and_counted(svc: Services) -> None:
    job_id = handed_out(svc)
    (claimed,) = svc.store.claim_due(10, 30)  # no backlog: the message is gone
    assert (claimed.job_id, claimed.token, claimed.resent) == (job_id, 2, True)


def test_a_job_whose_step_began_but_never_parked_is_sent_again_despite_a_backlog(
    svc: Services,
) -> None:
    """Its worker was killed mid-step: waiting for a queue to drain would not help."""
    job_id = handed_out(svc)
    assert svc.store.begin(job_id, 1, 0.0)[0] == "ok"  # began; the lease ends at once

    (claimed,) = svc.store.claim_due(10, 30, oldest_waiting={"submit": _oldest_waiting(svc, 60)})
    assert claimed.job_id == job_id and claimed.resent


def test_a_job_parked_by_its_step_is_not_a_resend(svc: Services) -> None:
    job_id, _ = new_job(svc)
    status, job = svc.store.begin(job_id, 0, 30)
    assert status == "ok" and job is not None
    assert svc.store.park(job, 0.0)

    backlog = {"submit": _oldest_waiting(svc, 60), "poll": _oldest_waiting(svc, 60)}
    (claimed,) = svc.store.claim_due(10, 30, oldest_waiting=backlog)
    assert not claimed.resent


def test_the_dispatcher_reads_the_send_time_of_the_oldest_waiting_message(svc: Services) -> None:
    """Messages carry their send time; the dispatcher looks at the head of each queue."""
    from worker.fleet.dispatcher import oldest_waiting

    assert oldest_waiting(svc) == {}
    job_id, _ = new_job(svc)
    before = svc.clock.now()
    svc.publisher.submit(job_id, {"prompt": "x"}, 0)
    svc.publisher.submit("another", {"prompt": "y"}, 0)

    waiting = oldest_waiting(svc)
    assert set(waiting) == {"submit"} and before - 1 <= waiting["submit"] <= svc.clock.now()


class _BuggyClient:
    """An upstream client with a bug: every recordInfo raises something unexpected."""

    def record_info(self, task_id: str) -> None:
        raise LookupError("unknown encoding: x-bogus")


def test_a_bug_in_a_poll_step_neither_fails_the_job_nor_escapes_its_deadline(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = make_services(upstream.url, remix_deadline_s=5.0, kie_request_deadline_s=2.0)
    job_id = _accepted_job(svc)
    svc.client = lambda: _BuggyClient()  # type: ignore[method-assign,assignment,return-value]

    assert _poll(svc, job_id) == "poll_error"
    record = svc.store.get(job_id)
    assert record is not None and record.state is JobState.SUBMITTED
    assert svc.store.scheduled(job_id) is not None

    svc.store.redis.hset(keys.job(job_id), "submitted_at", str(svc.clock.now() - 60))
    assert _poll(svc, job_id) == "timeout"
    assert "LookupError" in (svc.store.get(job_id).fail_msg or "")  # type: ignore[union-attr]


def test_an_upstream_failure_message_echoing_the_key_is_redacted(svc: Services) -> None:
    from worker.policies.poll import apply_task_info
    from worker.upstreams.kie import TaskInfo

    job_id = _accepted_job(svc)
    _, job = svc.store.begin(job_id, token_of(svc, job_id), 30)
    assert job is not None
    echo = f"could not use credentials (Bearer {API_KEY})"
    info = TaskInfo(task_id="t", state="fail", fail_code=f"E-{API_KEY[:12]}", fail_msg=echo)

    assert apply_task_info(svc, job, info, 1.0) == "failed"

    stored = repr(svc.store.redis.hgetall(keys.job(job_id)))
    stored += repr(svc.store.redis.get(f"celery-task-meta-{job_id}"))
    assert API_KEY[:10] not in stored and API_KEY[-10:] not in stored
