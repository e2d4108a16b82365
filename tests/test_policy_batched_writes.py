"""Writes a step gathers into fewer round trips keep their behaviour: a step's counts land
together when it ends, a job's finish and the read of its record are one round trip, a
result is Celery's own, the ``task-sent`` events of many messages are one PUBLISH, and a
busy fleet's submits are picked in batches."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery.result import AsyncResult
from kombu import Queue

from tests.policy_kit import enqueue_lined, new_job, submit_now, token_of
from tests.policy_kit import published as _published
from worker import keys
from worker.fleet import dispatcher as dispatcher_module
from worker.fleet.dispatcher import (
    DRAIN_FORGET_S,
    DRAIN_READING_S,
    DRAIN_SMOOTHING,
    MAX_ROOM_FACTOR,
    MIN_WAIT_S,
    PICKS_PER_SLOT,
    TICK_S,
    Dispatcher,
    QueueDrain,
)
from worker.fleet.steps import EventBatchStep
from worker.models import JobState
from worker.services import Services
from worker.store.clock import server_time
from worker.store.publisher import EVENT_FLUSH_S, POLL_QUEUE, SUBMIT_QUEUE, Publisher
from worker.tasks import _poll_batch


def _reads(client: redis.Redis) -> int:
    return int(client.info("stats")["total_reads_processed"])


def test_a_steps_counts_are_written_together_when_it_ends(svc: Services) -> None:
    client = svc.store.redis
    with svc.metrics.batched():
        svc.metrics.count("batched_total")
        svc.metrics.observe("record_info_seconds", 0.2, counting="record_info_total:200")
        svc.metrics.sample(keys.POLL_LATENESS, [0.5, 0.25, 0.125, 1.0], keep=3)
        assert client.hget(keys.METRICS, "batched_total") is None
        assert not client.exists(keys.POLL_LATENESS)
        before = _reads(client)
    # One request for the whole batch, plus the INFO that reads the count.
    assert _reads(client) - before == 2
    assert svc.metrics.read()["batched_total"] == 1
    assert svc.metrics.read()["record_info_total:200"] == 1
    assert svc.metrics.read_histogram("record_info_seconds")[2] == 1
    # The latest first, the oldest beyond ``keep`` dropped.
    assert client.lrange(keys.POLL_LATENESS, 0, -1) == [b"1.0000", b"0.1250", b"0.2500"]


def test_a_nested_batch_is_written_by_the_outer_one_and_counts_outside_at_once(
    svc: Services,
) -> None:
    with svc.metrics.batched():
        with svc.metrics.batched():
            svc.metrics.count("inner_total")
        assert svc.metrics.read().get("inner_total") is None
    assert svc.metrics.read()["inner_total"] == 1
    svc.metrics.count("alone_total", 2)
    assert svc.metrics.read()["alone_total"] == 2


def test_a_batch_that_redis_refuses_costs_the_step_nothing(svc: Services) -> None:
    dead = redis.Redis(host="127.0.0.1", port=9, socket_connect_timeout=0.2)
    offline = type(svc.metrics)(dead)
    with offline.batched():
        offline.count("lost_total")
        offline.observe("job_seconds", 1.0)


def test_finish_reading_moves_the_job_once_and_gives_its_record(svc: Services) -> None:
    job_id, prompt = new_job(svc)
    changed, found = svc.store.finish_reading(
        job_id, JobState.FAILED, fail_code="timeout", fail_msg="late"
    )
    assert changed and found is not None
    record, fields = found
    assert record.state is JobState.FAILED and record.fail_code == "timeout"
    assert fields["_request"]["prompt"] == prompt
    again, found_again = svc.store.finish_reading(job_id, JobState.SUCCEEDED)
    assert not again
    assert found_again is not None and found_again[0].state is JobState.FAILED


def test_finish_reading_works_on_a_server_that_lost_its_scripts(svc: Services) -> None:
    job_id, _ = new_job(svc)
    svc.store.redis.script_flush()
    changed, found = svc.store.finish_reading(job_id, JobState.SUCCEEDED)
    assert changed and found is not None and found[0].state is JobState.SUCCEEDED
    assert svc.store.get(job_id).state is JobState.SUCCEEDED  # type: ignore[union-attr]


def test_a_result_is_what_celery_reads_for_success_and_failure(svc: Services) -> None:
    app = svc.publisher.app
    done, _ = new_job(svc)
    svc.store.finish(done, JobState.SUCCEEDED, result_urls=["https://example.com/a.png"])
    failed, _ = new_job(svc)
    svc.store.finish(failed, JobState.FAILED, fail_code="content_policy", fail_msg="no")
    for job_id in (done, failed):
        svc.results.store(svc.store.get(job_id))  # type: ignore[arg-type]

    success = AsyncResult(done, app=app)
    assert success.state == "SUCCESS"
    assert success.result["result_urls"] == ["https://example.com/a.png"]
    failure = AsyncResult(failed, app=app)
    assert failure.state == "FAILURE"
    assert "content_policy" in str(failure.result)


def test_the_task_sent_events_of_a_dispatchers_rounds_go_out_in_one_publish(
    svc: Services, events: redis.client.PubSub
) -> None:
    ids = [uuid.uuid4().hex for _ in range(3)]
    for job_id in ids:  # three rounds of a dispatcher, each sending one message
        with svc.publisher.producer() as producer:
            svc.publisher.notify(job_id, 1, "https://hooks.example", producer=producer)
    svc.publisher.flush_events()
    assert _published(events) == []  # held until the oldest has waited EVENT_FLUSH_S

    time.sleep(EVENT_FLUSH_S)
    svc.publisher.flush_events()
    published = _published(events)
    assert len(published) == 1
    channel, body = published[0]
    assert channel.endswith("task.multi")
    assert [event["type"] for event in body] == ["task-sent"] * 3
    assert {event["name"] for event in body} == {"remix.notify"}


def test_new_jobs_are_announced_to_flower_in_one_publish(
    svc: Services, events: redis.client.PubSub
) -> None:
    jobs = [(uuid.uuid4().hex, {"prompt": f"job {n}"}) for n in range(4)]
    svc.publisher.announce(jobs)

    published = _published(events)
    assert len(published) == 1
    _, body = published[0]
    assert [event["uuid"] for event in body] == [job_id for job_id, _ in jobs]
    assert all(event["type"] == "task-sent" and event["name"] == "remix.submit" for event in body)


class _Hub:
    def __init__(self) -> None:
        self.later: list[tuple[float, Any]] = []

    def call_later(self, delay: float, callback: Any) -> None:
        self.later.append((delay, callback))


def test_a_workers_task_events_are_flushed_once_per_short_wait() -> None:
    flushes: list[int] = []
    consumer = SimpleNamespace(
        event_dispatcher=SimpleNamespace(on_send_buffered=lambda: None),
        hub=_Hub(),
        _flush_events=lambda: flushes.append(1),
    )
    step = EventBatchStep(consumer)
    step.start(consumer)
    for _ in range(5):
        consumer.event_dispatcher.on_send_buffered()
    assert [delay for delay, _ in consumer.hub.later] == [EVENT_FLUSH_S]

    consumer.hub.later[0][1]()
    assert flushes == [1]
    consumer.event_dispatcher.on_send_buffered()
    assert len(consumer.hub.later) == 2

    step.shutdown(consumer)  # what is still buffered goes before Celery closes it
    assert flushes == [1, 1]


def _tick_until_quiet(dispatcher: Dispatcher, rounds: int = 5) -> None:
    """Rounds until the picker may ask its budget again (the wait after a full queue)."""
    for _ in range(rounds):
        dispatcher.tick()
        time.sleep(dispatcher.seconds_to_next_round(0.06))


def test_a_busy_fleet_is_given_jobs_in_batches_not_one_per_round(svc: Services) -> None:
    enqueue_lined(svc, n=40)
    dispatcher = Dispatcher(svc, 1)  # one slot: room for PICKS_PER_SLOT queued submits
    _tick_until_quiet(dispatcher)
    broker = svc.broker
    assert broker.llen(SUBMIT_QUEUE) == PICKS_PER_SLOT

    # The worker takes a few: more than half is still queued, so nothing is picked yet.
    for _ in range(PICKS_PER_SLOT // 2 - 1):
        broker.rpop(SUBMIT_QUEUE)
    _tick_until_quiet(dispatcher)
    assert broker.llen(SUBMIT_QUEUE) == PICKS_PER_SLOT // 2 + 1

    # One more, and the queue is filled up again in one round.
    broker.rpop(SUBMIT_QUEUE)
    _tick_until_quiet(dispatcher)
    assert broker.llen(SUBMIT_QUEUE) == PICKS_PER_SLOT


def test_begin_many_begins_each_step_as_begin_does_in_one_round_trip(svc: Services) -> None:
    first, _ = new_job(svc)
    second, _ = new_job(svc)
    svc.store.finish(second, JobState.FAILED, fail_code="x", fail_msg="y")
    steps = [(first, token_of(svc, first)), (first, 99), (second, 0), ("no-such-job", 0)]
    svc.store.begin_many([("no-such-job", 0)], svc.settings.lease_s)  # scripts loaded
    before = _reads(svc.store.redis)
    begun = svc.store.begin_many(steps, svc.settings.lease_s)
    assert _reads(svc.store.redis) - before == 2  # the pipeline and the INFO reading it
    assert [status for status, _ in begun] == ["ok", "stale", "finished", "missing"]
    assert begun[0][1] is not None and begun[0][1].job_id == first

    svc.store.redis.script_flush()
    assert [s for s, _ in svc.store.begin_many([(first, token_of(svc, first))], 30.0)] == ["ok"]


def test_a_poll_batch_begins_its_jobs_together_and_polls_each(svc: Services) -> None:
    ids = [new_job(svc)[0] for _ in range(3)]
    for job_id in ids:
        assert submit_now(svc, job_id) == "accepted"
    time.sleep(0.8)  # the sandbox's generations (0.5 s) end; each job's first poll is due
    due = [d for d in svc.store.claim_due(10, svc.settings.lease_s) if d.job_id in ids]
    assert len(due) == 3
    other, _ = new_job(svc)
    batch = [[d.job_id, d.token, d.due] for d in due] + [[other, "not a token", 0.0]]

    steps = _poll_batch(svc, batch)

    assert steps == {**dict.fromkeys(ids, "succeeded"), other: "stale"}
    assert all(svc.store.get(job_id).polls == 1 for job_id in ids)  # type: ignore[union-attr]


def test_a_success_is_counted_for_the_breakers_with_the_steps_writes(svc: Services) -> None:
    svc.pause.note_answer("455")
    svc.pause.note_answer("455")
    with svc.metrics.batched():
        svc.pause.note_success(svc.metrics)
        svc.store.redis.script_flush()  # the server forgot the script meanwhile
        assert svc.pause.note_answer("455").maintenance_in_a_row == 3
    # Counted at the end of the step: the run of 455s is broken.
    assert svc.pause.note_answer("455").maintenance_in_a_row == 1
    assert svc.pause.note_answer("other").other == 2


def test_a_submit_step_begins_and_reads_its_keys_pause_in_one_round_trip(
    svc: Services,
) -> None:
    job_id, _ = new_job(svc)
    svc.store.begin_reading("no-such-job", 0, 30.0, svc.pause.key)  # scripts loaded
    token = token_of(svc, job_id)
    before = _reads(svc.store.redis)
    status, job, fields = svc.store.begin_reading(job_id, token, 30.0, svc.pause.key)
    assert _reads(svc.store.redis) - before == 2  # the pipeline and the INFO reading it
    assert status == "ok" and job is not None and fields == {}

    assert svc.pause.trip("455", "maintenance")
    svc.store.redis.script_flush()
    status, job, fields = svc.store.begin_reading(
        job_id, token_of(svc, job_id), 30.0, svc.pause.key
    )
    paused = svc.pause.state_of(fields)
    assert status == "ok" and paused is not None and paused.reason == "455"
    assert paused == svc.pause.state()


def test_the_drain_rate_comes_from_readings_far_enough_apart() -> None:
    drain = QueueDrain()
    drain.observe(20, now=100.0)
    drain.pushed(10)  # 30 queued after this dispatcher's round
    drain.observe(5, now=100.0 + DRAIN_READING_S / 2)  # too close: no reading yet
    assert drain.rate is None and drain.seconds_until(30, 10, TICK_S) == TICK_S
    drain.observe(10, now=101.0)  # 20 taken in one second
    assert drain.rate == pytest.approx(20.0)
    drain.observe(10, now=102.0)  # none taken: the fleet slowed down
    assert drain.rate == pytest.approx(20.0 * (1 - DRAIN_SMOOTHING))
    drain.observe(0, now=102.25)  # ran dry: at least 40 a second
    assert drain.rate == pytest.approx(40.0)
    assert drain.seconds_until(12, 10, TICK_S) == pytest.approx(2 / 40.0)
    assert drain.seconds_until(1000, 10, TICK_S) == TICK_S  # never longer than a round
    assert drain.seconds_until(10, 10, TICK_S) == MIN_WAIT_S


def test_a_fleet_that_drains_its_queue_fast_is_looked_at_again_sooner(svc: Services) -> None:
    enqueue_lined(svc, n=60)
    dispatcher = Dispatcher(svc, 2)
    dispatcher.tick()
    capacity = 2 * PICKS_PER_SLOT
    assert svc.broker.llen(SUBMIT_QUEUE) == capacity

    time.sleep(DRAIN_READING_S)
    for _ in range(capacity // 2 - 1):  # the fleet took almost half within the reading
        svc.broker.rpop(SUBMIT_QUEUE)
    assert dispatcher.tick() == 0  # more than half is still queued: nothing picked...
    assert svc.broker.llen(SUBMIT_QUEUE) == capacity // 2 + 1
    # ...and the next look comes when half is left at that rate, well within a round.
    assert dispatcher.seconds_to_next_round(TICK_S) < TICK_S


def test_the_drain_rate_is_forgotten_when_nothing_was_queued_to_take() -> None:
    drain = QueueDrain()
    drain.observe(10, now=100.0)
    drain.observe(0, now=101.0)
    assert drain.rate == pytest.approx(10.0)
    drain.observe(0, now=101.0 + DRAIN_FORGET_S / 2)  # an empty queue tells nothing...
    assert drain.rate == pytest.approx(10.0)
    drain.observe(0, now=101.0 + DRAIN_FORGET_S * 1.5)  # ...and after a while, no rate
    assert drain.rate is None and drain.within(1.0) == 0


def test_a_fleet_that_drains_its_queue_fast_may_have_more_queued_within_a_bound(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatcher_module, "QUEUE_AHEAD_S", 1.0)  # however slow this machine
    enqueue_lined(svc, n=150)
    dispatcher = Dispatcher(svc, 1)
    dispatcher.tick()
    assert svc.broker.llen(SUBMIT_QUEUE) == PICKS_PER_SLOT  # the rate is not known yet

    svc.broker.delete(SUBMIT_QUEUE)  # the worker took them all within the reading
    time.sleep(DRAIN_READING_S)
    dispatcher.tick()
    rate = dispatcher._submit_drain.rate
    assert rate is not None and rate * 1.0 > PICKS_PER_SLOT * MAX_ROOM_FACTOR
    assert svc.broker.llen(SUBMIT_QUEUE) == PICKS_PER_SLOT * MAX_ROOM_FACTOR


def test_announcing_new_jobs_sends_nothing_in_the_enqueues_path(
    svc: Services, events: redis.client.PubSub
) -> None:
    first = [(uuid.uuid4().hex, {"prompt": "first"})]
    then = [(uuid.uuid4().hex, {"prompt": f"then {n}"}) for n in range(2)]
    before = _reads(svc.store.redis)
    svc.publisher.announce(first)
    svc.publisher.announce(then)
    assert _reads(svc.store.redis) - before == 1  # the INFO that reads the count: no PUBLISH

    published = _published(events)  # sent by the process's announcer, in one PUBLISH
    assert len(published) == 1
    assert [event["uuid"] for event in published[0][1]] == [j for j, _ in first + then]


def test_a_dispatchers_round_is_one_round_trip_for_all_its_messages(svc: Services) -> None:
    ids = [uuid.uuid4().hex for _ in range(5)]
    with svc.publisher.batch() as producer:  # the connection and the exchange, once
        svc.publisher.submit("warm-up", {"prompt": "x"}, 1, producer=producer)
    svc.broker.delete(SUBMIT_QUEUE)
    before = _reads(svc.broker)
    with svc.publisher.batch() as producer:
        for job_id in ids:
            svc.publisher.submit(job_id, {"prompt": "x"}, 1, producer=producer)
        assert svc.broker.llen(SUBMIT_QUEUE) == 0  # held until the round ends
    assert _reads(svc.broker) - before == 2 + 1  # the LLEN above, the round, this INFO
    assert svc.broker.llen(SUBMIT_QUEUE) == len(ids)


def test_a_round_whose_publish_fails_makes_all_its_jobs_due_again(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = enqueue_lined(svc, n=3)
    dispatcher = Dispatcher(svc, 2)

    @contextlib.contextmanager
    def failing_batch() -> Iterator[Any]:
        with svc.publisher.producer() as producer:
            yield producer
        raise redis.ConnectionError("the round trip broke; any message may be delivered")

    monkeypatch.setattr(svc.publisher, "batch", failing_batch)
    with pytest.raises(redis.ConnectionError):
        dispatcher.tick()
    # The server's own clock, which due_now.lua writes and claim_due.lua reads: the
    # client's estimate of it is off by up to half a round trip, more on a loaded machine.
    now = server_time(svc.store.redis)
    due = [svc.store.scheduled(job_id) for job_id in ids]
    assert all(at is not None and at <= now for at in due), (due, now)


def test_a_new_connection_declares_each_queue_once_before_its_first_message(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """And later messages skip the declaration outright (kombu's own skip costs a copy
    of the queue bound to the channel, a tenth of a dispatcher's publish)."""
    declared: list[str] = []
    bound: list[str] = []
    real_declare, real_bind = Queue.declare, Queue.bind

    def declare(queue: Queue, *args: Any, **kwargs: Any) -> Any:
        declared.append(queue.name)
        return real_declare(queue, *args, **kwargs)

    def bind(queue: Queue, *args: Any, **kwargs: Any) -> Any:
        bound.append(queue.name)
        return real_bind(queue, *args, **kwargs)

    monkeypatch.setattr(Queue, "declare", declare)
    monkeypatch.setattr(Queue, "bind", bind)
    publisher = Publisher(svc.publisher.app, svc.clock)  # its batches: a connection of its own
    ids = [uuid.uuid4().hex for _ in range(3)]
    for _ in range(2):
        with publisher.batch() as producer:
            for job_id in ids:
                publisher.submit(job_id, {"prompt": "x"}, 1, producer=producer)
            publisher.poll([(ids[0], 1, 0.0)], producer=producer)
    assert sorted(declared) == [POLL_QUEUE, SUBMIT_QUEUE]
    assert sorted(set(bound)) == [POLL_QUEUE, SUBMIT_QUEUE] and len(bound) <= 4, bound
    assert svc.broker.llen(SUBMIT_QUEUE) == 2 * len(ids)
    assert svc.broker.llen(POLL_QUEUE) == 2
