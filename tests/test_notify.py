"""Completion webhooks end to end: real workers, the sandbox over HTTP, a real receiver.

The workers allow loopback receivers (``REMIX_NOTIFY_ALLOW_PRIVATE``), sign with a key of
this module's, give up after three tries and time a delivery out after 2 s.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producers import cancel_job, enqueue_remix, get_job, wait_for_job
from producers.fleet import pause_submissions, resume_submissions
from sandbox.launch import ManagedProcess
from tests.conftest import REMIX_INPUT, TEST_REDIS_URL, unique_prompt
from tests.helpers import redis_value, wait_until
from tests.webhook_receiver import WebhookReceiver, free_port, receiver
from worker import keys
from worker.models import InvalidRequestError, JobRecord, JobState
from worker.policies.notify import DELIVERY_HEADER

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("fleet")]

HMAC_KEY = f"whsec-NOTIFY-{uuid.uuid4().hex}"
WORKER_SETTINGS = {
    "REMIX_NOTIFY_ALLOW_PRIVATE": "1",
    "REMIX_NOTIFY_HMAC_KEY": HMAC_KEY,
    "REMIX_NOTIFY_MAX_ATTEMPTS": "3",
    "REMIX_NOTIFY_TIMEOUT_S": "2",
    "REMIX_NOTIFY_RETRY_BASE_S": "0.2",
    "REMIX_NOTIFY_RETRY_MAX_S": "1",
}
WORKER_COUNT = 2
JOB_TIMEOUT_S = 60
PRODUCERS_DOC = Path(__file__).resolve().parents[1] / "docs" / "producers.md"


@pytest.fixture(scope="module", autouse=True)
def producer_allows_loopback() -> Iterator[None]:
    """This process enqueues like a producer that may name a loopback receiver."""
    configure_producer(allow_private=True)
    yield
    configure_producer(allow_private=False)


def configure_producer(*, allow_private: bool) -> None:
    from worker.app import configure

    configure(
        redis_url=TEST_REDIS_URL,
        result_backend_url=TEST_REDIS_URL,
        remix_notify_allow_private=allow_private,
    )


@contextlib.contextmanager
def producer_refusing_private() -> Iterator[None]:
    configure_producer(allow_private=False)
    try:
        yield
    finally:
        configure_producer(allow_private=True)


@pytest.fixture
def hooks() -> Iterator[WebhookReceiver]:
    with receiver() as server:
        yield server


def documented_verifier() -> Callable[..., dict[str, Any]]:
    """The receiver snippet of docs/producers.md, run as written."""
    blocks = re.findall(r"```python\n(.*?)```", PRODUCERS_DOC.read_text(), flags=re.S)
    [snippet] = [b for b in blocks if "def verify_remixq_webhook" in b]
    namespace: dict[str, Any] = {}
    exec(compile(snippet, str(PRODUCERS_DOC), "exec"), namespace)
    return namespace["verify_remixq_webhook"]  # type: ignore[no-any-return]


def enqueue(prompt: str, url: str | None, **fields: Any) -> str:
    return enqueue_remix(prompt=prompt, notify_url=url, **REMIX_INPUT, **fields)  # type: ignore[arg-type]


def notification_of(job_id: str) -> dict[str, Any] | None:
    record = get_job(job_id)
    return (
        None if record is None or record.notification is None else record.notification.model_dump()
    )


def queued(job_id: str) -> bool:
    record = get_job(job_id)
    return record is None or record.state is JobState.QUEUED


def settled(job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    """The job's notification once it is delivered or given up."""

    def done() -> dict[str, Any]:
        note = notification_of(job_id)
        return note if note and note["state"] != "pending" else {}

    return wait_until(done, timeout, interval=0.1)


def test_each_finished_job_is_delivered_once_and_verifies_with_the_documented_snippet(
    hooks: WebhookReceiver,
) -> None:
    verify = documented_verifier()
    succeeded = enqueue(unique_prompt("notify-ok"), hooks.url("/succeeded"))
    failed = enqueue(unique_prompt("[sandbox:create=422] notify"), hooks.url("/failed"))
    # Only the cancelled job is to meet the pause: the other two are past submitting first.
    wait_until(lambda: not any(queued(job_id) for job_id in (succeeded, failed)), JOB_TIMEOUT_S)
    assert pause_submissions("notify cancel test")
    try:
        cancelled = enqueue(unique_prompt("notify-cancel"), hooks.url("/cancelled"))
        assert cancel_job(cancelled).state is JobState.CANCELLED
    finally:
        resume_submissions()

    states = {}
    for job_id, path in ((succeeded, "/succeeded"), (failed, "/failed"), (cancelled, "/cancelled")):
        record = wait_for_job(job_id, timeout=JOB_TIMEOUT_S)
        note = settled(job_id)
        assert note["state"] == "delivered" and note["attempts"] == 1, note
        states[path] = record
    time.sleep(3)  # room for a duplicate to arrive

    for path, record in states.items():
        [got] = hooks.deliveries(path)
        body = verify(HMAC_KEY, got.headers, got.body)
        assert body["delivery_id"] == got.headers[DELIVERY_HEADER.lower()]
        sent = JobRecord.model_validate(body)
        assert sent.model_dump(exclude={"notification"}) == record.model_dump(
            exclude={"notification"}
        )
        with pytest.raises(ValueError):
            verify(HMAC_KEY, got.headers, got.body.replace(b'"job_id"', b'"job_iD"'))
        with pytest.raises(ValueError):
            verify("another key", got.headers, got.body)
    assert states["/succeeded"].state is JobState.SUCCEEDED
    assert states["/failed"].state is JobState.FAILED
    assert states["/cancelled"].state is JobState.CANCELLED


def test_a_receiver_failing_first_gets_it_on_a_later_try(hooks: WebhookReceiver) -> None:
    hooks.plan("/flaky", 500)
    job_id = enqueue(unique_prompt("notify-flaky"), hooks.url("/flaky"))

    note = settled(job_id)

    assert note["state"] == "delivered" and note["attempts"] == 2
    assert note["last_error"] is None and note["delivered_at"] is not None
    first, second = hooks.deliveries("/flaky")
    assert first.headers[DELIVERY_HEADER.lower()] == second.headers[DELIVERY_HEADER.lower()]


def test_a_refused_connection_is_retried_until_the_receiver_is_up() -> None:
    port = free_port()
    job_id = enqueue(unique_prompt("notify-refused"), f"http://127.0.0.1:{port}/late")
    wait_until(
        lambda: (notification_of(job_id) or {}).get("last_error") == "connection refused",
        JOB_TIMEOUT_S,
    )

    with receiver(port) as late:
        note = settled(job_id)
        # A second refused try may come before the receiver is up; the third is the last.
        assert note["state"] == "delivered" and note["attempts"] in (2, 3), note
        assert len(late.deliveries("/late")) == 1


def test_a_receiver_that_never_answers_2xx_is_given_up(hooks: WebhookReceiver) -> None:
    hooks.plan("/down", *[503] * 5)
    job_id = enqueue(unique_prompt("notify-down"), hooks.url("/down"))

    note = settled(job_id)

    assert (note["state"], note["attempts"], note["last_error"]) == ("failed", 3, "HTTP 503")
    time.sleep(2)
    assert len(hooks.deliveries("/down")) == 3


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://10.1.2.3/hook",
        "http://localhost:8080/x",
        "http://[::1]/x",
    ],
)
def test_a_private_url_is_refused_at_enqueue(redis_client: redis.Redis, url: str) -> None:
    before = (redis_client.llen("submit"), redis_client.zcard(keys.SCHEDULE))
    with producer_refusing_private(), pytest.raises(InvalidRequestError) as caught:
        enqueue(unique_prompt("notify-private"), url)
    message = str(caught.value)
    assert message.startswith("invalid request: notify_url: ") and "\n" not in message
    assert (redis_client.llen("submit"), redis_client.zcard(keys.SCHEDULE)) == before


def test_configuring_the_producer_again_keeps_it_publishing(hooks: WebhookReceiver) -> None:
    """``configure`` used to close kombu's connection pool for the broker URL but leave it
    in kombu's registry, so the next publish to the same URL failed ("Acquire on closed
    pool")."""
    first = enqueue(unique_prompt("configure-1"), hooks.url("/again"))
    configure_producer(allow_private=True)
    second = enqueue(unique_prompt("configure-2"), hooks.url("/again"))
    for job_id in (first, second):
        assert wait_for_job(job_id, timeout=JOB_TIMEOUT_S).state is JobState.SUCCEEDED


def _time_to_finish(count: int, label: str) -> float:
    started = time.monotonic()
    job_ids = [enqueue(unique_prompt(f"{label}-{i}"), None) for i in range(count)]
    for job_id in job_ids:
        assert wait_for_job(job_id, timeout=JOB_TIMEOUT_S).state is JobState.SUCCEEDED
    return time.monotonic() - started


def test_hanging_receivers_do_not_slow_the_pipeline() -> None:
    """Each holds one worker slot at a time, all of them at most half the fleet's (2 of
    2 workers x 2), and jobs go on finishing as fast as before."""
    baseline = _time_to_finish(12, "pace-before")
    with contextlib.ExitStack() as stack:
        hanging_receivers = [stack.enter_context(receiver()) for _ in range(3)]
        hanging = []
        for n, hooks in enumerate(hanging_receivers):
            for i in range(2):
                hooks.plan(f"/hang/{i}", *["hang"] * 3)
                hanging.append(enqueue(unique_prompt(f"hang-{n}-{i}"), hooks.url(f"/hang/{i}")))
        with InFlightSampler(hanging_receivers) as sampler:
            wait_until(lambda: sampler.now() >= 2, JOB_TIMEOUT_S)
            started = time.monotonic()
            during = _time_to_finish(12, "pace-during")
            window = sampler.between(started, started + during)

        print(f"pace: {baseline:.2f} s before, {during:.2f} s while hanging")
        assert during <= 2 * baseline + 2.0, (baseline, during)
        assert sum(1 for n in window if n >= 1) >= 0.8 * len(window), "they did not hang"
        assert sampler.most <= 2  # half the fleet's 4 slots
        assert all(hooks.most_in_flight <= 1 for hooks in hanging_receivers), [
            (h.most_in_flight, [(d.path, round(d.at - started, 2)) for d in h.deliveries()])
            for h in hanging_receivers
        ]
        for hooks in hanging_receivers:
            hooks.release()  # what is left fails fast or answers 200: let it settle
        for job_id in hanging:
            settled(job_id)


class InFlightSampler:
    """Samples how many requests the receivers hold at once, every 20 ms."""

    def __init__(self, receivers: list[WebhookReceiver]) -> None:
        self.receivers = receivers
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        return sum(r.in_flight for r in self.receivers)

    @property
    def most(self) -> int:
        return max((n for _, n in self.samples), default=0)

    def between(self, start: float, end: float) -> list[int]:
        return [n for at, n in self.samples if start <= at <= end]

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.samples.append((time.monotonic(), self.now()))

    def __enter__(self) -> InFlightSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


def test_the_hmac_key_is_in_no_log_and_no_redis_value(
    redis_client: redis.Redis, fleet: list[ManagedProcess], hooks: WebhookReceiver
) -> None:
    """Nor is the producer's URL beyond its host: its query may hold a secret of theirs."""
    producer_token = f"producer-token-{uuid.uuid4().hex}"
    path = f"/secret?token={producer_token}"
    hooks.plan(path, 500)  # a failed try is logged too
    job_id = enqueue(unique_prompt("notify-secret"), hooks.url(path))
    assert settled(job_id)["state"] == "delivered"

    secret = HMAC_KEY.encode()
    for key in redis_client.scan_iter("*"):
        assert secret not in key and secret not in redis_value(redis_client, key), key
    assert HMAC_KEY not in json.dumps(notification_of(job_id))
    got = hooks.deliveries(path)[-1]
    assert secret not in got.body and HMAC_KEY not in json.dumps(got.headers)
    logs = b"".join(w.log_path.read_bytes() for w in fleet if w.log_path)
    assert f"job {job_id}: webhook delivered".encode() in logs  # really the workers' logs
    assert f"job {job_id}: webhook to".encode() in logs
    assert secret not in logs and producer_token.encode() not in logs
