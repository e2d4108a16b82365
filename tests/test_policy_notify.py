"""The completion-webhook path without a worker: real Redis, a real receiver on 127.0.0.1.

Each test finishes a job the way the pipeline does (``update.lua`` schedules its webhook),
claims it as the dispatcher would (``claim_notify.lua``) and runs one delivery step at a
time, then looks at the record, the notify schedule and what the receiver got.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from sandbox.server import SandboxServer
from tests.helpers import raw_http_server, redis_value, start_snapshot_redis, wait_until
from tests.outbound_kit import PUBLIC, Network, network, recorder
from tests.policy_kit import INPUT, make_services, new_job
from tests.webhook_receiver import Delivery, WebhookReceiver, free_port, loopback_name, receiver
from worker import keys
from worker.fleet.dispatcher import Dispatcher
from worker.fleet.side_dispatch import dispatch_notifications
from worker.models import JobState
from worker.policies.notify import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    notify_step,
    post,
    signature,
)
from worker.services import Services
from worker.store.clock import server_time
from worker.store.notify import (
    MOST_IN_FLIGHT_PER_RECEIVER,
    NotifyDispatch,
    notify_store,
)
from worker.store.publisher import Publisher

__all__ = ["network"]  # the fixture, used by name

HMAC_KEY = f"notify-key-{uuid.uuid4().hex}"
NOTIFY: dict[str, Any] = {
    "remix_notify_allow_private": True,
    "remix_notify_hmac_key": HMAC_KEY,
    "remix_notify_timeout_s": 1.0,
    "remix_notify_retry_base_s": 0.05,
    "remix_notify_retry_max_s": 0.2,
    "remix_notify_max_attempts": 3,
}


@pytest.fixture
def svc(policy_redis: redis.Redis, upstream: SandboxServer) -> Services:
    return make_services(upstream.url, **NOTIFY)


@pytest.fixture
def hooks() -> Iterator[WebhookReceiver]:
    with receiver() as server:
        yield server


def finished_job(
    svc: Services, url: str, state: JobState = JobState.SUCCEEDED, **fields: object
) -> str:
    """A job with a webhook, finished as the pipeline finishes one."""
    job_id = uuid.uuid4().hex
    svc.store.create(job_id, {"prompt": f"notify {job_id[:8]}", **INPUT}, due_in=60, notify_url=url)
    if state is JobState.SUCCEEDED:
        fields = {"result_urls": ["https://example.test/out.png"], **fields}
    assert svc.store.finish(job_id, state, **fields)
    return job_id


def claim(
    svc: Services, limit: int = 10, oldest: float | None = None, fleet_slots: int | None = None
) -> list[NotifyDispatch]:
    return notify_store(svc).claim(
        limit, svc.settings, oldest_waiting=oldest, fleet_slots=fleet_slots
    )


def claim_one(svc: Services, job_id: str, timeout: float = 5.0) -> NotifyDispatch:
    """Claim until the job's webhook is handed out (it may be due a little later)."""
    found: list[NotifyDispatch] = []

    def handed_out() -> bool:
        found.extend(d for d in claim(svc) if d.job_id == job_id)
        return bool(found)

    wait_until(handed_out, timeout, interval=0.02)
    return found[0]


def step(svc: Services, job_id: str) -> str:
    item = claim_one(svc, job_id)
    return notify_step(svc, item.job_id, item.token, item.receiver)


def notification(svc: Services, job_id: str) -> dict[str, object]:
    record = svc.store.get(job_id)
    assert record is not None and record.notification is not None
    return record.notification.model_dump()


def test_a_finished_job_is_delivered_once_signed(svc: Services, hooks: WebhookReceiver) -> None:
    job_id = finished_job(svc, hooks.url("/ok"))
    before = svc.store.get(job_id)

    assert step(svc, job_id) == "delivered"

    [got] = hooks.deliveries("/ok")
    body = json.loads(got.body)
    assert body["job_id"] == job_id and body["state"] == "succeeded"
    assert body["result_urls"] == ["https://example.test/out.png"]
    assert body["notification"] == {
        "state": "pending",
        "attempts": 0,
        "delivered_at": None,
        "last_error": None,
    }
    assert got.headers[DELIVERY_HEADER.lower()] == body["delivery_id"]
    timestamp = got.headers[TIMESTAMP_HEADER.lower()]
    assert abs(int(timestamp) - time.time()) < 5
    assert got.headers[SIGNATURE_HEADER.lower()] == signature(HMAC_KEY, timestamp, got.body)
    assert got.headers["content-type"] == "application/json"
    note = notification(svc, job_id)
    assert note["state"] == "delivered" and note["attempts"] == 1 and note["last_error"] is None
    assert isinstance(note["delivered_at"], float)
    assert note["delivered_at"] >= before.finished_at  # type: ignore[union-attr,operator]
    after = svc.store.get(job_id)
    assert after is not None and before is not None
    assert after.model_dump(exclude={"notification"}) == before.model_dump(exclude={"notification"})
    assert notify_store(svc).due(job_id) is None
    assert claim(svc) == []
    assert svc.metrics.read().get("notify_total:delivered") == 1


def test_failed_and_cancelled_jobs_are_delivered_too(svc: Services, hooks: WebhookReceiver) -> None:
    failed = finished_job(svc, hooks.url("/f"), JobState.FAILED, fail_code="422", fail_msg="no")
    cancelled = uuid.uuid4().hex
    svc.store.create(cancelled, {"prompt": "c", **INPUT}, due_in=60, notify_url=hooks.url("/c"))
    assert svc.store.cancel(cancelled) == "cancelled"

    assert step(svc, failed) == "delivered"
    assert step(svc, cancelled) == "delivered"

    assert json.loads(hooks.deliveries("/f")[0].body)["fail_code"] == "422"
    assert json.loads(hooks.deliveries("/c")[0].body)["state"] == "cancelled"


def test_without_a_key_the_webhook_is_sent_unsigned(
    policy_redis: redis.Redis, upstream: SandboxServer, hooks: WebhookReceiver
) -> None:
    svc = make_services(upstream.url, **{**NOTIFY, "remix_notify_hmac_key": None})
    job_id = finished_job(svc, hooks.url("/unsigned"))
    assert step(svc, job_id) == "delivered"
    assert SIGNATURE_HEADER.lower() not in hooks.deliveries("/unsigned")[0].headers


def test_a_job_without_notify_url_schedules_no_webhook(svc: Services) -> None:
    job_id = uuid.uuid4().hex
    svc.store.create(job_id, {"prompt": "plain", **INPUT}, due_in=60)
    assert svc.store.finish(job_id, JobState.SUCCEEDED)
    assert svc.store.get(job_id).notification is None  # type: ignore[union-attr]
    assert claim(svc) == []


def test_a_500_is_retried_with_the_same_delivery_id(svc: Services, hooks: WebhookReceiver) -> None:
    hooks.plan("/flaky", 500)
    job_id = finished_job(svc, hooks.url("/flaky"))

    assert step(svc, job_id) == "retry"
    note = notification(svc, job_id)
    assert (note["state"], note["attempts"], note["last_error"]) == ("pending", 1, "HTTP 500")
    due = notify_store(svc).due(job_id)
    assert due is not None and due <= svc.clock.now() + 0.2 + 0.05

    assert step(svc, job_id) == "delivered"
    first, second = hooks.deliveries("/flaky")
    assert first.headers[DELIVERY_HEADER.lower()] == second.headers[DELIVERY_HEADER.lower()]
    assert json.loads(second.body)["notification"]["attempts"] == 1
    note = notification(svc, job_id)
    assert (note["state"], note["attempts"], note["last_error"]) == ("delivered", 2, None)
    counts = svc.metrics.read()
    assert counts.get("notify_total:retry") == 1 and counts.get("notify_total:delivered") == 1


def test_connection_refused_then_a_receiver_appears(svc: Services) -> None:
    port = free_port()
    job_id = finished_job(svc, f"http://127.0.0.1:{port}/late")

    assert step(svc, job_id) == "retry"
    assert notification(svc, job_id)["last_error"] == "connection refused"

    with receiver(port) as late:
        assert step(svc, job_id) == "delivered"
        assert len(late.deliveries("/late")) == 1
    assert notification(svc, job_id)["attempts"] == 2


def test_given_up_after_the_most_attempts(svc: Services, hooks: WebhookReceiver) -> None:
    hooks.plan("/down", 503, 503, 503, 503)
    job_id = finished_job(svc, hooks.url("/down"))

    assert [step(svc, job_id) for _ in range(3)] == ["retry", "retry", "failed"]

    note = notification(svc, job_id)
    assert (note["state"], note["attempts"], note["last_error"]) == ("failed", 3, "HTTP 503")
    assert notify_store(svc).due(job_id) is None
    time.sleep(0.3)
    assert claim(svc) == []
    assert len(hooks.deliveries("/down")) == 3
    assert svc.metrics.read().get("notify_total:failed") == 1


def test_a_hanging_receiver_is_cut_at_the_timeout(svc: Services, hooks: WebhookReceiver) -> None:
    hooks.plan("/hang", "hang")
    job_id = finished_job(svc, hooks.url("/hang"))
    started = time.monotonic()

    assert step(svc, job_id) == "retry"

    assert time.monotonic() - started < 3.0
    assert notification(svc, job_id)["last_error"] in ("no answer within 1 s", "timed out")


def test_a_receiver_trickling_its_answer_is_cut_at_the_total_timeout(svc: Services) -> None:
    """One byte every 0.2 s never trips the read timeout; the total deadline cuts it."""

    def trickle(conn: socket.socket) -> None:
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
            conn.sendall(bytes([byte]))
            time.sleep(0.2)

    with raw_http_server(trickle) as base:
        job_id = finished_job(svc, f"{base}/trickle")
        started = time.monotonic()
        assert step(svc, job_id) == "retry"
        assert time.monotonic() - started < 2.5
    assert notification(svc, job_id)["last_error"] == "no answer within 1 s"


def test_a_redirect_is_not_followed(svc: Services, hooks: WebhookReceiver) -> None:
    """Not even to a receiver that would answer 200 (a redirect could point anywhere)."""
    hooks.plan("/moved", ("redirect", hooks.url("/target")))
    job_id = finished_job(svc, hooks.url("/moved"))

    assert step(svc, job_id) == "retry"

    assert notification(svc, job_id)["last_error"] == "HTTP 302, a redirect (not followed)"
    assert hooks.deliveries("/target") == []


def test_a_huge_answer_is_not_read(svc: Services, hooks: WebhookReceiver) -> None:
    hooks.plan("/huge", "huge")
    job_id = finished_job(svc, hooks.url("/huge"))
    started = time.monotonic()

    assert step(svc, job_id) == "delivered"

    assert time.monotonic() - started < 1.0


def test_a_name_resolving_to_loopback_is_refused_at_delivery(
    policy_redis: redis.Redis, upstream: SandboxServer, hooks: WebhookReceiver
) -> None:
    name = loopback_name()
    if name is None:
        pytest.skip("no host name other than localhost resolves to loopback here")
    svc = make_services(upstream.url, **{**NOTIFY, "remix_notify_allow_private": False})
    job_id = finished_job(svc, f"http://{name}:{hooks.port}/private")

    assert step(svc, job_id) == "failed"

    note = notification(svc, job_id)
    assert note["attempts"] == 1
    assert note["last_error"] == "refused: not a public address"
    assert hooks.deliveries() == []
    assert notify_store(svc).due(job_id) is None


def test_a_loopback_url_is_refused_before_connecting(svc: Services, hooks: WebhookReceiver) -> None:
    settings = svc.settings.model_copy(update={"remix_notify_allow_private": False})

    attempt = post(hooks.url("/loopback"), b"{}", {}, settings)

    assert attempt.refused and attempt.error == "refused: not a public address"
    assert hooks.deliveries() == []


def test_a_rebound_name_never_reaches_an_internal_port(
    svc: Services, hooks: WebhookReceiver, network: Network
) -> None:
    """DNS rebinding: the name answers a public address, then a loopback one. Whether the
    internal port is open or closed, the delivery goes to the address that was checked:
    no error tells the ports apart, and the internal receiver gets nothing."""
    settings = svc.settings.model_copy(update={"remix_notify_allow_private": False})
    errors = []
    with recorder() as standin:
        network.route(PUBLIC, standin.port)
        for port in (hooks.port, free_port()):
            network.answer("hooks.example", [PUBLIC], ["127.0.0.1"])
            errors.append(post(f"http://hooks.example:{port}/hook", b"{}", {}, settings).error)

    assert errors == [None, None]
    assert network.connects == [PUBLIC, PUBLIC]
    assert [seen.path for seen in standin.requests] == ["/hook", "/hook"]
    assert hooks.deliveries() == []


def test_a_stale_message_delivers_nothing(svc: Services, hooks: WebhookReceiver) -> None:
    job_id = finished_job(svc, hooks.url("/stale"))
    item = claim_one(svc, job_id)

    assert notify_step(svc, job_id, item.token - 1, item.receiver) == "stale"
    assert hooks.deliveries() == []
    assert notify_step(svc, job_id, item.token, item.receiver) == "delivered"


def test_an_expired_record_leaves_the_schedule(svc: Services, hooks: WebhookReceiver) -> None:
    job_id = finished_job(svc, hooks.url("/gone"))
    item = claim_one(svc, job_id)
    svc.store.redis.delete(keys.job(job_id))

    assert notify_step(svc, job_id, item.token, item.receiver) == "missing"

    assert notify_store(svc).due(job_id) is None
    assert svc.store.redis.zcard(keys.notify_busy(item.receiver)) == 0
    assert not svc.store.redis.exists(keys.job(job_id))  # the end script wrote nothing


def test_a_new_receiver_gets_one_delivery_at_a_time_then_more(
    svc: Services, hooks: WebhookReceiver
) -> None:
    jobs = [finished_job(svc, hooks.url(f"/many/{i}")) for i in range(4)]

    first = claim(svc)
    assert len(first) == 1  # new receiver: one in flight
    assert claim(svc) == []  # the others are held back while it is in flight
    held = [j for j in jobs if j != first[0].job_id]
    assert all(notify_store(svc).due(j) > svc.clock.now() for j in held)  # type: ignore[operator]
    assert notify_step(svc, first[0].job_id, first[0].token, first[0].receiver) == "delivered"

    # One 2xx: two may be in flight now.
    second: list[NotifyDispatch] = []
    deadline = time.monotonic() + 3
    while len(second) < 2 and time.monotonic() < deadline:
        second += claim(svc)
        time.sleep(0.02)
    assert len(second) == 2 and claim(svc) == []
    assert MOST_IN_FLIGHT_PER_RECEIVER >= 2


def test_a_failing_receiver_goes_back_to_one_at_a_time(
    svc: Services, hooks: WebhookReceiver
) -> None:
    receiver_key = keys.notify_receiver(f"http://127.0.0.1:{hooks.port}")
    svc.store.redis.hset(receiver_key, "streak", 5)
    hooks.plan("/r/0", 500)
    jobs = [finished_job(svc, hooks.url(f"/r/{i}")) for i in range(3)]
    claimed = claim(svc)
    assert len(claimed) == 3
    by_job = {d.job_id: d for d in claimed}

    assert notify_step(svc, jobs[0], by_job[jobs[0]].token, by_job[jobs[0]].receiver) == "retry"

    assert int(svc.store.redis.hget(receiver_key, "streak")) == 0  # type: ignore[arg-type]


def test_all_deliveries_together_hold_at_most_half_the_fleets_slots(svc: Services) -> None:
    """However many receivers there are (each new one may take one delivery)."""
    jobs = [finished_job(svc, f"http://127.0.0.1:{free_port()}/x") for _ in range(3)]

    first = claim(svc, fleet_slots=4)
    assert len(first) == 2  # half of 4 slots
    assert claim(svc, fleet_slots=4) == []
    ended = first[0]
    store = notify_store(svc)
    assert store.end(ended.job_id, ended.token, ended.receiver, "dropped") == "ok"

    later = wait_until(lambda: claim(svc, fleet_slots=4), 5, interval=0.02)
    assert [d.job_id for d in later] == [j for j in jobs if j not in {d.job_id for d in first}]
    assert claim(svc, fleet_slots=1) == []  # at least one, never more than half


def test_heartbeats_tell_the_fleets_size(svc: Services) -> None:
    one, other = Dispatcher(svc, slots=3), Dispatcher(svc, slots=5)
    other.name = "another-host:1"
    one.heartbeat()
    other.heartbeat()
    assert other.fleet_slots == 8
    one.heartbeat()
    assert one.fleet_slots == 8


def test_the_dispatcher_publishes_a_webhook_without_its_url(
    svc: Services, hooks: WebhookReceiver, policy_redis: redis.Redis
) -> None:
    job_id = finished_job(svc, hooks.url("/private-path?token=producer-secret"))

    Dispatcher(svc, slots=2).tick()

    [raw] = policy_redis.lrange("notify", 0, -1)
    message = json.loads(raw)
    assert message["headers"]["task"] == "remix.notify"
    assert job_id in message["headers"]["kwargsrepr"]
    assert b"producer-secret" not in raw and b"private-path" not in raw
    assert b"producer-secret" not in base64.b64decode(message["body"])


def test_a_failing_webhook_claim_never_keeps_jobs_from_being_sent(
    svc: Services, hooks: WebhookReceiver, policy_redis: redis.Redis
) -> None:
    finished_job(svc, hooks.url("/later"))
    policy_redis.set(keys.NOTIFY_IN_FLIGHT, "not a sorted set")  # every webhook claim fails
    waiting, _ = new_job(svc)
    dispatcher = Dispatcher(svc, slots=2)

    assert dispatcher.tick() == 1

    assert policy_redis.llen("submit") == 1 and policy_redis.llen("notify") == 0
    policy_redis.delete(keys.NOTIFY_IN_FLIGHT)
    assert dispatcher.tick() == 1
    assert policy_redis.llen("notify") == 1
    assert svc.store.get(waiting) is not None


def test_a_lost_message_is_sent_again_after_its_lease(
    svc: Services, hooks: WebhookReceiver
) -> None:
    """Unless a backlog in the notify queue may still hold it (then it keeps waiting)."""
    job_id = finished_job(svc, hooks.url("/lost"))
    item = claim_one(svc, job_id)
    sent_at = float(svc.store.get_internal(job_id, "_notify_sent_at"))
    assert notify_store(svc).due(job_id) > svc.clock.now() + 5  # type: ignore[operator]
    svc.store.redis.zadd(keys.NOTIFY_SCHEDULE, {job_id: 0})  # the lease ran out

    assert claim(svc, oldest=sent_at - 1) == []  # an older message waits: ours may too

    svc.store.redis.zadd(keys.NOTIFY_SCHEDULE, {job_id: 0})
    [again] = claim(svc, oldest=sent_at + 60)  # only younger ones wait: ours is gone
    assert again.resent and again.token == item.token + 1
    assert notify_step(svc, job_id, item.token, item.receiver) == "stale"
    assert notify_step(svc, job_id, again.token, again.receiver) == "delivered"
    assert len(hooks.deliveries("/lost")) == 1


def test_a_refused_publish_makes_the_webhook_due_again(
    svc: Services, hooks: WebhookReceiver
) -> None:
    job_id = finished_job(svc, hooks.url("/unsent"))
    dead = Celery("dead-broker", set_as_current=False)
    dead.conf.update(
        broker_url=f"redis://127.0.0.1:{free_port()}/0",
        broker_connection_timeout=0.5,
        broker_transport_options={"socket_connect_timeout": 0.5},
    )
    offline = dataclasses.replace(svc, publisher=Publisher(dead, svc.clock))

    with pytest.raises(Exception):  # noqa: B017 - whatever kombu raises for a dead broker
        dispatch_notifications(offline)

    # Against Redis's TIME, which the schedule's scripts write with (clock.now() is an
    # estimate of it that may trail by half a round trip).
    assert notify_store(svc).due(job_id) <= server_time(svc.store.redis)  # type: ignore[operator]
    assert svc.store.get_internal(job_id, "_notify_sent_at") is None
    [item] = claim(svc)
    assert item.job_id == job_id and not item.resent
    assert notify_step(svc, job_id, item.token, item.receiver) == "delivered"


def test_the_key_is_in_no_record_and_no_redis_value(
    svc: Services, hooks: WebhookReceiver, policy_redis: redis.Redis
) -> None:
    hooks.plan("/k", 500)
    job_id = finished_job(svc, hooks.url("/k"))
    step(svc, job_id)
    step(svc, job_id)
    for key in policy_redis.scan_iter("*"):
        assert HMAC_KEY.encode() not in redis_value(policy_redis, key), key
    assert all(HMAC_KEY not in json.dumps(d.headers) for d in hooks.deliveries())


# ------------------------------------------------------------------ Redis lost mid-delivery


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A redis-server of this test's own (so it can be stopped), with an RDB file."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    process = start_snapshot_redis(port, tmp_path)
    yield url, tmp_path
    with_redis = redis.Redis.from_url(url)
    with contextlib.suppress(redis.RedisError):
        with_redis.shutdown(nosave=True)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)


def test_redis_lost_while_the_outcome_is_written_means_the_same_delivery_again(
    private_redis: tuple[str, Path], upstream: SandboxServer, hooks: WebhookReceiver
) -> None:
    """The receiver got it, the outcome could not be written: after the lease it comes
    again with the same delivery id (at least once), and then it is recorded."""
    url, directory = private_redis
    fields = {**NOTIFY, "redis_url": url, "result_backend_url": url}
    svc = make_services(upstream.url, redis_retry_s=0.3, **fields)
    port = int(url.rsplit(":", 1)[1].split("/")[0])

    def stop_redis(_: Delivery) -> int:
        client = redis.Redis.from_url(url)
        client.save()  # what was written so far survives the stop
        client.shutdown(nosave=True)
        return 200

    hooks.plan("/blip", stop_redis)
    job_id = finished_job(svc, hooks.url("/blip"))
    item = claim_one(svc, job_id)

    with pytest.raises(redis.ConnectionError):
        notify_step(svc, job_id, item.token, item.receiver)

    start_snapshot_redis(port, directory)
    assert notification(svc, job_id)["state"] == "pending"  # not lost, not delivered
    assert notify_store(svc).due(job_id) is not None
    svc.store.redis.zadd(keys.NOTIFY_SCHEDULE, {job_id: 0})  # its lease runs out
    again = claim_one(svc, job_id)
    assert again.resent
    assert notify_step(svc, job_id, again.token, again.receiver) == "delivered"
    first, second = hooks.deliveries("/blip")
    assert first.headers[DELIVERY_HEADER.lower()] == second.headers[DELIVERY_HEADER.lower()]
    assert notification(svc, job_id)["attempts"] == 1
