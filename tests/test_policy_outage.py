"""After an outage of the broker, jobs whose message a worker dropped move again at once.

A worker that loses its broker connection drops the messages it had taken but not started
(they come back only after the broker's visibility timeout), and a message popped in the
instant the broker went down may be gone. Such a job must not wait for its lease: the
dispatcher that sees Redis and the broker answer again sends it at once, unless its message
may still be waiting in its queue. Real Redis, no worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from sandbox.launch import free_port
from sandbox.server import SandboxServer
from tests.helpers import start_snapshot_redis
from tests.policy_kit import make_services, new_job, pick_now, token_of
from worker.fleet.dispatcher import Dispatcher, DispatcherThread
from worker.services import Services
from worker.store.publisher import SUBMIT_QUEUE

pytestmark = pytest.mark.policy


def hand_out(svc: Services) -> tuple[str, float]:
    """A queued job whose first message was handed out; returns (job id, hand-out time)."""
    job_id, _ = new_job(svc)
    (claimed,) = pick_now(svc)
    assert claimed.job_id == job_id
    return job_id, float(svc.store.get_internal(job_id, "_dispatched_at"))


def test_a_job_taken_before_the_outage_and_never_begun_is_due_at_once(svc: Services) -> None:
    job_id, _ = hand_out(svc)
    assert svc.store.claim_due(10, svc.settings.lease_s) == []  # its lease holds it

    assert svc.store.resend_stranded(svc.settings.lease_s) == 1

    [again] = svc.store.claim_due(10, svc.settings.lease_s, oldest_waiting={"submit": time.time()})
    assert again.job_id == job_id and again.token == 2


def test_a_job_whose_step_began_is_left_to_that_step(svc: Services) -> None:
    job_id, _ = hand_out(svc)
    status, _ = svc.store.begin(job_id, token_of(svc, job_id), svc.settings.lease_s)
    assert status == "ok"
    due = svc.store.scheduled(job_id)

    assert svc.store.resend_stranded(svc.settings.lease_s) == 0
    assert svc.store.scheduled(job_id) == due


def test_a_parked_job_keeps_its_moment(svc: Services) -> None:
    job_id, _ = hand_out(svc)
    _, job = svc.store.begin(job_id, token_of(svc, job_id), svc.settings.lease_s)
    assert job is not None and svc.store.park(job, due_in=20.0)
    due = svc.store.scheduled(job_id)

    assert svc.store.resend_stranded(svc.settings.lease_s) == 0
    assert svc.store.scheduled(job_id) == due


def test_a_job_whose_message_may_still_wait_in_its_queue_is_left_to_it(svc: Services) -> None:
    job_id, handed_out = hand_out(svc)
    due = svc.store.scheduled(job_id)

    waiting = {"submit": handed_out - 1.0}  # the queue's oldest message is older than it
    assert svc.store.resend_stranded(svc.settings.lease_s, oldest_waiting=waiting) == 0
    assert svc.store.scheduled(job_id) == due
    # A poll queue's head says nothing about a job without an upstream task.
    assert (
        svc.store.resend_stranded(svc.settings.lease_s, oldest_waiting={"poll": handed_out - 1.0})
        == 1
    )


def test_a_job_handed_out_after_the_outage_began_is_left_alone(svc: Services) -> None:
    job_id, handed_out = hand_out(svc)
    due = svc.store.scheduled(job_id)

    assert svc.store.resend_stranded(svc.settings.lease_s, handed_out_before=handed_out - 0.5) == 0
    assert svc.store.scheduled(job_id) == due
    assert svc.store.resend_stranded(svc.settings.lease_s, handed_out_before=handed_out + 0.5) == 1


def test_finished_and_cancelled_jobs_are_not_sent_again(svc: Services) -> None:
    job_id, _ = hand_out(svc)
    assert svc.store.cancel(job_id) in {"cancelled", "ok"}

    assert svc.store.resend_stranded(svc.settings.lease_s) == 0


class BrokerAwayFor(Dispatcher):
    """A dispatcher whose first rounds meet a broker that is away."""

    def __init__(self, svc: Services, failures: int) -> None:
        super().__init__(svc)
        self.failures = failures
        self.recovered = threading.Event()

    def tick(self) -> int:
        if self.failures:
            self.failures -= 1
            raise redis.ConnectionError("Connection refused (the broker is away)")
        self.recovered.set()
        return super().tick()


def test_the_dispatcher_sends_a_dropped_message_again_once_the_broker_answers(
    svc: Services, policy_redis: redis.Redis
) -> None:
    job_id, _ = hand_out(svc)  # taken by a worker, which dropped it when its broker went
    dispatcher = BrokerAwayFor(svc, failures=2)
    thread = DispatcherThread(make_dispatcher=lambda: dispatcher)
    thread.start()
    try:
        assert dispatcher.recovered.wait(10)
        deadline = time.monotonic() + 5
        while policy_redis.llen(SUBMIT_QUEUE) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        thread.stop()

    assert policy_redis.llen(SUBMIT_QUEUE) == 1  # long before its lease (18 s)
    assert token_of(svc, job_id) == 2
    assert svc.metrics.read().get("lease_resends_total") == 1


def test_a_consumer_that_reconnected_has_its_dropped_messages_sent_again(
    svc: Services, policy_redis: redis.Redis
) -> None:
    """The dispatcher's own commands ride out a short outage; the consumer's reconnection
    is what tells it that messages were dropped."""
    job_id, _ = hand_out(svc)  # taken by this worker's consumer...
    thread = DispatcherThread(make_dispatcher=lambda: Dispatcher(svc))
    thread.start()
    try:
        thread.broker_lost()  # ...which then lost its connection and dropped it
        time.sleep(0.3)
        assert policy_redis.llen(SUBMIT_QUEUE) == 0  # its lease still holds it
        thread.broker_returned()
        deadline = time.monotonic() + 5
        while policy_redis.llen(SUBMIT_QUEUE) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        thread.stop()

    assert policy_redis.llen(SUBMIT_QUEUE) == 1
    assert token_of(svc, job_id) == 2


class ClaimsNothing(Dispatcher):
    """A dispatcher that only looks for stranded jobs (its rounds claim nothing)."""

    def __init__(self, svc: Services) -> None:
        super().__init__(svc)
        self.looked = threading.Event()

    def tick(self) -> int:
        self.heartbeat()  # which also measures the fleet clock
        return 0

    def after_outage(self, began_at: float | None) -> int:
        try:
            return super().after_outage(began_at)
        finally:
            self.looked.set()


def test_a_reconnection_leaves_jobs_handed_out_after_the_connection_was_lost(
    svc: Services,
) -> None:
    dispatcher = ClaimsNothing(svc)
    thread = DispatcherThread(make_dispatcher=lambda: dispatcher)
    thread.start()
    try:
        time.sleep(0.2)
        thread.broker_lost()
        time.sleep(0.05)
        job_id, _ = hand_out(svc)  # its message went out after the consumer's loss
        due = svc.store.scheduled(job_id)
        thread.broker_returned()
        assert dispatcher.looked.wait(5)
    finally:
        thread.stop()

    assert svc.store.scheduled(job_id) == due
    assert token_of(svc, job_id) == 1


def test_the_schedule_is_read_page_by_page(svc: Services) -> None:
    stranded = [new_job(svc)[0] for _ in range(5)]
    assert len(pick_now(svc)) == len(stranded)
    began = [new_job(svc)[0] for _ in range(3)]
    for claimed in pick_now(svc):
        assert svc.store.begin(claimed.job_id, claimed.token, svc.settings.lease_s)[0] == "ok"

    assert svc.store.resend_stranded(svc.settings.lease_s, page=2) == len(stranded)
    again = svc.store.claim_due(20, svc.settings.lease_s)
    assert sorted(d.job_id for d in again) == sorted(stranded)
    assert not set(began) & {d.job_id for d in again}


def test_after_a_job_store_failover_jobs_are_left_to_their_lease(svc: Services) -> None:
    """The new server may lack the record that a step began while its createTask is still
    in flight: only the lease outlasts that request."""
    job_id, _ = hand_out(svc)
    due = svc.store.scheduled(job_id)
    dispatcher = Dispatcher(svc)
    dispatcher.watch_store()
    dispatcher._store_run_id = "the-server-before-the-failover"

    assert dispatcher.after_outage(svc.clock.now()) == 0
    assert svc.store.scheduled(job_id) == due
    # The next outage, with the job store unchanged, is handled again.
    assert dispatcher.after_outage(svc.clock.now() + 2 * svc.settings.lease_s) == 1


@pytest.fixture
def redis_without_info(tmp_path: Path) -> Iterator[str]:
    """A redis-server with INFO disabled, as some hosted services have it."""
    port = free_port()
    process = start_snapshot_redis(port, tmp_path, "--rename-command", "INFO", '""')
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


def test_a_job_store_that_does_not_say_who_it_is_leaves_jobs_to_their_lease(
    redis_without_info: str, upstream: SandboxServer
) -> None:
    """Without INFO nothing tells a failover that lost a step's begin from a step that
    never began: the lease decides, and the dispatcher goes on working."""
    svc = make_services(
        upstream.url, redis_url=redis_without_info, result_backend_url=redis_without_info
    )
    job_id, _ = hand_out(svc)
    due = svc.store.scheduled(job_id)
    dispatcher = Dispatcher(svc)
    dispatcher.tick()

    assert dispatcher.after_outage(svc.clock.now()) == 0
    assert svc.store.scheduled(job_id) == due


def test_a_job_store_failover_a_while_before_the_outage_still_leaves_jobs_to_their_lease(
    svc: Services,
) -> None:
    """A step whose begin the failover lost may wait for its createTask answer for a whole
    request deadline after it: an outage within a lease of the failover must not send its
    job again."""
    job_id, _ = hand_out(svc)
    due = svc.store.scheduled(job_id)
    dispatcher = Dispatcher(svc)
    dispatcher.watch_store()
    dispatcher._store_run_id = "the-server-before-the-failover"
    dispatcher.watch_store()  # a heartbeat notices the new server

    outage_began = svc.clock.now() + 15.0  # the broker goes away 15 s later
    assert dispatcher.after_outage(outage_began) == 0
    assert svc.store.scheduled(job_id) == due
