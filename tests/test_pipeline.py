"""The pipeline end to end: real Redis, real celery workers, the sandbox over HTTP."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
import redis
import requests
from celery.result import AsyncResult
from PIL import Image

from producers import enqueue_remix, get_job, wait_for_job
from sandbox.control import SandboxControl
from sandbox.launch import ManagedProcess
from tests.conftest import REMIX_INPUT, SECRET_API_KEY, unique_prompt
from tests.helpers import accepted, create_requests, redis_value, wait_until
from worker.app import app
from worker.models import JobState
from worker.upstreams.errors import JobFailed

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("fleet")]
JOB_TIMEOUT_S = 60


def _enqueue(prompt: str, **fields: object) -> str:
    return enqueue_remix(prompt=prompt, **REMIX_INPUT, **fields)  # type: ignore[arg-type]


def test_happy_path_produces_images_and_celery_result(control: SandboxControl) -> None:
    prompt = unique_prompt("happy")
    job_id = _enqueue(prompt, num_images=2, strength=0.5)
    assert get_job(job_id) is not None

    record = wait_for_job(job_id, timeout=JOB_TIMEOUT_S)

    assert record.state is JobState.SUCCEEDED
    assert record.upstream_task_id and record.fail_code is None
    assert record.submit_attempts == 1 and record.polls >= 1
    assert record.created_at <= record.submitted_at <= record.finished_at  # type: ignore[operator]
    assert len(record.result_urls) == 2
    for url in record.result_urls:
        image = Image.open(io.BytesIO(requests.get(url, timeout=5).content))
        assert image.format == "PNG" and image.width > 0
    assert accepted(control, prompt) == 1
    result = AsyncResult(job_id, app=app).get(timeout=5)
    assert result == record.model_dump(mode="json")


@pytest.mark.parametrize("code", [429, 455, 500])
@pytest.mark.parametrize("style", ["http", "body"])
def test_retryable_codes_are_retried_to_success(
    control: SandboxControl, code: int, style: str
) -> None:
    control.configure(faults={code: 1.0}, fault_style=style, fault_endpoints=["createTask"])
    prompt = unique_prompt(f"retry-{code}-{style}")
    job_id = _enqueue(prompt)
    wait_until(lambda: create_requests(control, prompt) >= 3, timeout=20)
    control.configure(faults={})

    record = wait_for_job(job_id, timeout=JOB_TIMEOUT_S)

    assert record.state is JobState.SUCCEEDED
    assert record.submit_attempts == create_requests(control, prompt) >= 4
    assert accepted(control, prompt) == 1


def test_connection_resets_are_retried_to_success(control: SandboxControl) -> None:
    control.configure(reset_rate=1.0, fault_endpoints=["createTask"])
    prompt = unique_prompt("reset")
    job_id = _enqueue(prompt)
    wait_until(lambda: create_requests(control, prompt) >= 2, timeout=20)
    control.configure(reset_rate=0.0)

    record = wait_for_job(job_id, timeout=JOB_TIMEOUT_S)

    assert record.state is JobState.SUCCEEDED
    assert record.submit_attempts >= 3
    assert accepted(control, prompt) == 1


def test_html_proxy_pages_are_retried(control: SandboxControl) -> None:
    control.configure(html_rate=1.0, fault_endpoints=["createTask"])
    prompt = unique_prompt("html")
    job_id = _enqueue(prompt)
    wait_until(lambda: create_requests(control, prompt) >= 2, timeout=20)
    control.configure(html_rate=0.0)
    assert wait_for_job(job_id, timeout=JOB_TIMEOUT_S).state is JobState.SUCCEEDED


@pytest.mark.parametrize("code", [404, 422, 501, 505])
def test_permanent_codes_fail_after_exactly_one_request(control: SandboxControl, code: int) -> None:
    prompt = unique_prompt(f"[sandbox:create={code}]")
    job_id = _enqueue(prompt)

    record = wait_for_job(job_id, timeout=JOB_TIMEOUT_S)

    assert record.state is JobState.FAILED
    assert record.fail_code == str(code)
    assert record.submit_attempts == 1
    assert create_requests(control, prompt) == 1
    assert accepted(control, prompt) == 0
    with pytest.raises(JobFailed, match=str(code)):
        AsyncResult(job_id, app=app).get(timeout=5)


def test_wrong_key_fails_with_401_after_one_request(control: SandboxControl) -> None:
    control.configure(api_key="sk-some-other-key")
    prompt = unique_prompt("unauthorized")
    record = wait_for_job(_enqueue(prompt), timeout=JOB_TIMEOUT_S)
    assert (record.state, record.fail_code) == (JobState.FAILED, "401")
    assert create_requests(control, prompt) == 1


def test_upstream_generation_failure_is_reported(control: SandboxControl) -> None:
    prompt = unique_prompt("[sandbox:fail]")
    record = wait_for_job(_enqueue(prompt), timeout=JOB_TIMEOUT_S)
    assert record.state is JobState.FAILED
    assert record.fail_code == "501" and record.fail_msg
    assert record.upstream_task_id and record.polls >= 1
    assert accepted(control, prompt) == 1


def test_transient_record_info_errors_do_not_fail_the_job(control: SandboxControl) -> None:
    control.configure(faults={500: 1.0}, fault_endpoints=["recordInfo"])
    prompt = unique_prompt("poll-errors")
    job_id = _enqueue(prompt)
    wait_until(lambda: (get_job(job_id) or get_job(job_id)).polls >= 3, timeout=30)  # type: ignore[union-attr]
    assert get_job(job_id).state is JobState.SUBMITTED  # type: ignore[union-attr]
    control.configure(faults={})
    record = wait_for_job(job_id, timeout=JOB_TIMEOUT_S)
    assert record.state is JobState.SUCCEEDED
    assert record.polls >= 4


def test_same_idempotency_key_returns_same_job(
    control: SandboxControl, redis_client: redis.Redis
) -> None:
    prompt = unique_prompt("idempotent")
    key = f"order-{prompt}"
    first = _enqueue(prompt, idempotency_key=key)
    second = _enqueue(prompt, idempotency_key=key)
    assert first == second
    assert wait_for_job(first, timeout=JOB_TIMEOUT_S).state is JobState.SUCCEEDED
    assert _enqueue(prompt, idempotency_key=key) == first
    assert create_requests(control, prompt) == 1


def test_foreign_producer_sends_remix_submit_by_name(control: SandboxControl) -> None:
    prompt = unique_prompt("foreign")
    request = {"prompt": prompt, **REMIX_INPUT, "num_images": 1}
    sent = app.send_task("remix.submit", kwargs={"request": request}, queue="submit")

    record = wait_until(lambda: get_job(sent.id), timeout=10)
    record = wait_for_job(record.job_id, timeout=JOB_TIMEOUT_S)

    assert record.job_id == sent.id and record.state is JobState.SUCCEEDED
    assert accepted(control, prompt) == 1


def test_foreign_producer_invalid_request_fails_without_upstream_call(
    control: SandboxControl,
) -> None:
    prompt = unique_prompt("foreign-bad")
    request = {"prompt": prompt, **REMIX_INPUT, "strength": 0.35}
    sent = app.send_task("remix.submit", kwargs={"request": request, "job_id": f"j-{prompt[-10:]}"})

    record = wait_for_job(wait_until(lambda: get_job(f"j-{prompt[-10:]}"), 10).job_id, timeout=20)

    assert sent.id
    assert record.state is JobState.FAILED and record.fail_code == "invalid_request"
    assert "strength" in (record.fail_msg or "")
    assert create_requests(control, prompt) == 0


def test_bad_input_enqueues_nothing(redis_client: redis.Redis) -> None:
    before_jobs = len(list(redis_client.scan_iter("remixq:job:*")))
    before_queue = redis_client.llen("submit")
    with pytest.raises(ValueError, match="image_url"):
        enqueue_remix(prompt="x", image_url="nope", reference_image_urls=["https://e.test/r"])
    assert len(list(redis_client.scan_iter("remixq:job:*"))) == before_jobs
    assert redis_client.llen("submit") == before_queue


def test_api_key_never_stored_in_redis_or_logged(
    control: SandboxControl,
    redis_client: redis.Redis,
    fleet: list[ManagedProcess],
) -> None:
    control.configure(faults={429: 1.0}, fault_endpoints=["createTask"])
    prompt = unique_prompt("secret-check")
    job_id = _enqueue(prompt)
    wait_until(lambda: create_requests(control, prompt) >= 2, timeout=20)
    control.configure(faults={})
    wait_for_job(job_id, timeout=JOB_TIMEOUT_S)

    secret = SECRET_API_KEY.encode()
    for key in redis_client.scan_iter("*"):
        value = redis_value(redis_client, key)
        assert secret not in value and secret not in key, key
    for worker in fleet:
        assert worker.log_path is not None
        log = worker.log_path.read_bytes()
        assert b"remix.submit" in log  # the log is really the worker's
        assert secret not in log


def test_a_job_whose_message_was_lost_is_sent_by_the_schedule(control: SandboxControl) -> None:
    """No message at all (the broker lost it, the producer died): the schedule sends the job."""
    from worker.app import services

    prompt = unique_prompt("lost-message")
    store = services().store
    job_id, created = store.create(
        f"lost-{prompt[-10:]}", {"prompt": prompt, **REMIX_INPUT}, due_in=0.5
    )
    assert created

    record = wait_for_job(job_id, timeout=JOB_TIMEOUT_S)

    assert record.state is JobState.SUCCEEDED
    assert accepted(control, prompt) == 1
    assert store.scheduled(job_id) is None  # a finished job leaves the schedule


def test_a_submit_published_through_the_exchange_is_delivered_once(
    control: SandboxControl, fleet: list[ManagedProcess]
) -> None:
    """Each queue has its own exchange: a message sent to ``submit`` never lands in ``poll``.

    Sent during a pause, where a deferral used to re-publish the message to both queues and
    the deliveries doubled each time; a parked job now sends nothing while it waits.
    """
    from producers.fleet import pause_submissions, resume_submissions

    prompt = unique_prompt("exchange")
    job_id = f"exchange-{prompt[-10:]}"
    request = {"prompt": prompt, **REMIX_INPUT}
    assert pause_submissions("exchange test")
    try:
        app.send_task(
            "remix.submit",
            kwargs={"request": request, "job_id": job_id},
            task_id=job_id,
            exchange="submit",
            routing_key="submit",
        )
        wait_until(lambda: get_job(job_id), timeout=10)
        time.sleep(3)
        assert _deliveries(fleet, job_id) == 1
    finally:
        resume_submissions()

    assert wait_for_job(job_id, timeout=JOB_TIMEOUT_S).state is JobState.SUCCEEDED
    assert accepted(control, prompt) == 1
    assert _deliveries(fleet, job_id) == 2  # the first, and the one sent when the pause ended


def _deliveries(fleet: list[ManagedProcess], job_id: str) -> int:
    logs = (w.log_path.read_text(errors="replace") for w in fleet if w.log_path)
    return sum(log.count(f"Task remix.submit[{job_id}] received") for log in logs)


def test_a_worker_without_q_consumes_every_queue_each_behind_its_own_exchange(
    fleet: list[ManagedProcess], redis_client: redis.Redis
) -> None:
    """``submit``, ``poll``, ``notify`` (completion webhooks) and ``archive`` (result
    images): a worker started without ``-Q`` (as the Procfile starts it) consumes all four,
    and each queue's exchange routes to that queue only."""
    from worker.app import QUEUES

    assert [(q.name, q.exchange.name, q.routing_key) for q in QUEUES] == [
        ("submit", "submit", "submit"),
        ("poll", "poll", "poll"),
        ("notify", "notify", "notify"),
        ("archive", "archive", "archive"),
    ]
    replies = app.control.inspect(destination=[fleet[0].name], timeout=5).active_queues() or {}
    assert {q["name"] for q in replies[fleet[0].name]} == {"submit", "poll", "notify", "archive"}
    for queue in QUEUES:
        bindings = redis_client.smembers(f"_kombu.binding.{queue.name}")
        assert bindings
        assert {b.split(b"\x06\x16")[-1] for b in bindings} == {queue.name.encode()}


def test_stale_bindings_of_an_older_version_are_dropped(redis_client: redis.Redis) -> None:
    from worker.app import drop_stale_bindings

    stale = b"submit\x06\x16\x06\x16poll"
    redis_client.sadd("_kombu.binding.submit", stale)
    redis_client.sadd("_kombu.binding.submit", b"submit\x06\x16\x06\x16submit")

    assert drop_stale_bindings(redis_client) >= 1
    assert redis_client.smembers("_kombu.binding.submit") == {b"submit\x06\x16\x06\x16submit"}


def test_unreadable_items_on_a_queue_do_not_take_a_worker_down(
    control: SandboxControl, redis_client: redis.Redis, fleet: list[ManagedProcess]
) -> None:
    """A buggy producer in another language pushes garbage: each item is dropped, loudly."""
    # A real envelope, from a queue no worker reads, to spoil its body.
    sent = app.send_task(
        "remix.submit", kwargs={"request": {"prompt": "x", **REMIX_INPUT}}, queue="unread"
    )
    template = json.loads(redis_client.lpop("unread"))  # type: ignore[arg-type]
    bad_body = json.dumps({**template, "body": "%%%not-base64%%%"})
    for poison in (b"\x00\xffgarbage", json.dumps("hello"), json.dumps({"body": "x"}), bad_body):
        redis_client.lpush("submit", poison)
    assert sent.id

    prompt = unique_prompt("after-poison")
    record = wait_for_job(_enqueue(prompt), timeout=JOB_TIMEOUT_S)

    assert record.state is JobState.SUCCEEDED
    assert all(w.popen.poll() is None for w in fleet), "a worker died"
    logs = "".join(w.log_path.read_text(errors="replace") for w in fleet if w.log_path)
    assert logs.count("dropped an unreadable message") >= 4


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"request": None}, "expected a JSON object"),
        ({"requests": {"prompt": "x"}}, "unknown argument"),
        ({"request": {"prompt": "x", **REMIX_INPUT}, "job_id": 12345}, "job_id"),
        ({"request": {"prompt": "x", **REMIX_INPUT}, "job_id": "x" * 300}, "job_id"),
        ({"request": {"prompt": "x", **REMIX_INPUT}, "dispatch": "x"}, "dispatch"),
        ({"request": {"prompt": "x", **REMIX_INPUT}, "dispatch": -1}, "dispatch"),
        ({"request": {"prompt": "x", **REMIX_INPUT}, "dispatch": True}, "dispatch"),
    ],
)
def test_a_malformed_foreign_message_fails_its_job_with_invalid_request(
    control: SandboxControl, fleet: list[ManagedProcess], kwargs: dict[str, object], reason: str
) -> None:
    """A producer in another language gets an answer under the job id it used, or else
    under the message's task id; the worker stays up."""
    sent = app.send_task("remix.submit", kwargs=kwargs)
    job_id = kwargs.get("job_id") if isinstance(kwargs.get("job_id"), str) else sent.id
    if isinstance(job_id, str) and len(job_id) > 200:
        job_id = sent.id

    record = wait_for_job(wait_until(lambda: get_job(str(job_id)), 10).job_id, timeout=20)

    assert record.state is JobState.FAILED and record.fail_code == "invalid_request"
    assert reason in (record.fail_msg or "")
    assert all(w.popen.poll() is None for w in fleet)


def test_an_unreadable_item_already_held_is_acknowledged_not_restored_forever(
    redis_client: redis.Redis, fleet: list[ManagedProcess]
) -> None:
    """A real envelope whose body is not a task: kombu records it as held before Celery
    fails to read it; dropping it must also acknowledge it, or it comes back every
    visibility timeout."""
    app.send_task("remix.submit", kwargs={"request": {"prompt": "x"}}, queue="unread")
    envelope = json.loads(redis_client.lpop("unread"))  # type: ignore[arg-type]
    envelope["body"] = base64.b64encode(json.dumps({"a": 1}).encode()).decode()
    tag = envelope["properties"]["delivery_tag"]
    redis_client.lpush("submit", json.dumps(envelope))

    logs = lambda: "".join(w.log_path.read_text(errors="replace") for w in fleet if w.log_path)  # noqa: E731
    wait_until(lambda: "not enough values to unpack" in logs(), timeout=15)
    time.sleep(1)

    assert not redis_client.hexists("unacked", tag)
    assert all(w.popen.poll() is None for w in fleet)


def test_a_request_sent_by_position_fails_its_job_with_invalid_request(
    control: SandboxControl, fleet: list[ManagedProcess]
) -> None:
    sent = app.send_task("remix.submit", args=[{"prompt": "x", **REMIX_INPUT}])

    record = wait_for_job(wait_until(lambda: get_job(sent.id), 10).job_id, timeout=20)

    assert record.state is JobState.FAILED and record.fail_code == "invalid_request"
    assert "keyword argument request" in (record.fail_msg or "")
