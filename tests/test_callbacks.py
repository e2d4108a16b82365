"""Upstream callbacks end to end: real uvicorn, real workers, the sandbox calling back.

The module starts its own sandbox (signing callbacks with a webhook key), the HTTP app
(``uvicorn producers.http:app`` on a free port, the address the workers send as
``callBackUrl``) and its own workers (one at a time), with a first (safety-net) poll 30 s
after a task is accepted. So a job that finishes within a second of its generation was
finished by the sandbox's callback, and the sandbox's recordInfo counter shows that nobody
polled it. Each test starts from a sandbox without tasks or counters.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from producers import enqueue_remix, get_job, wait_for_job
from sandbox.control import SandboxControl
from sandbox.launch import (
    LOOPBACK,
    REPO_ROOT,
    ManagedProcess,
    free_port,
    start_sandbox,
    start_worker,
)
from tests.conftest import REMIX_INPUT, SECRET_API_KEY, WORKER_ARGS, unique_prompt, worker_env
from tests.helpers import accepted, create_requests, wait_until
from tests.test_policy_callbacks import write_commands
from worker import keys
from worker.models import JobRecord, JobState

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HMAC_KEY = f"whk-SECRET-{uuid.uuid4().hex}"
GENERATION_S = 2.0
SAFETY_NET_POLL_S = "30"
APP_START_TIMEOUT_S = 30.0
JOB_TIMEOUT_S = 60.0
#: Callback end to end: the sandbox's 50 ms tick, its POST, the app's Redis work; with
#: room for two shared cores.
CALLBACK_LATENCY_S = 1.0
WINDOW_S = 300
CAP = 64 * 1024
REFUSED = "callbacks_refused_total:"


# ----------------------------------------------------------------------------- processes


@pytest.fixture(scope="module")
def upstream(log_dir: Path) -> Iterator[ManagedProcess]:
    """A sandbox of this module's own; the webhook key goes over its control endpoint (a
    command-line argument would show in ``ps``)."""
    process = start_sandbox(
        args=["--api-key", SECRET_API_KEY, "--generation-seconds", str(GENERATION_S)],
        log_path=log_dir / "callbacks-sandbox.log",
    )
    assert process.url is not None
    SandboxControl(process.url).configure(webhook_hmac_key=HMAC_KEY)
    yield process
    process.stop()


@pytest.fixture
def control(upstream: ManagedProcess) -> Iterator[SandboxControl]:
    assert upstream.url is not None
    ctl = SandboxControl(upstream.url)
    ctl.configure(trickle_rate=0.0, slow_rate=0.0, faults={}, generation_seconds=GENERATION_S)
    ctl.reset()
    yield ctl
    ctl.configure(trickle_rate=0.0, slow_rate=0.0, faults={})
    ctl.close()


@pytest.fixture(scope="module")
def app_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def callback_url(app_port: int) -> str:
    return f"http://{LOOPBACK}:{app_port}/v1/callbacks/kie"


def settings_env(upstream_url: str, callback_url: str, **overrides: str) -> dict[str, str]:
    """Workers' and the app's environment: callbacks on, the first poll 30 s away."""
    settings = {
        "KIE_CALLBACK_URL": callback_url,
        "KIE_WEBHOOK_HMAC_KEY": HMAC_KEY,
        "REMIX_POLL_INITIAL_S": SAFETY_NET_POLL_S,
        "REMIX_POLL_MAX_S": SAFETY_NET_POLL_S,
        "REMIX_CALLBACK_POLL_S": SAFETY_NET_POLL_S,
        "REMIX_CALLBACK_WAIT_S": "600",
        "KIE_CALLBACK_WINDOW_S": str(WINDOW_S),
        "KIE_CALLBACK_MAX_BYTES": str(CAP),
    }
    return worker_env(upstream_url, **{**settings, **overrides})


def start_app(env: dict[str, str], port: int, log_path: Path) -> ManagedProcess:
    """``uvicorn producers.http:app`` in its own process group; waits for ``/healthz``."""
    command = [sys.executable, "-m", "uvicorn", "producers.http:app"]
    command += ["--host", LOOPBACK, "--port", str(port), "--workers", "1"]
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    process = ManagedProcess(popen, url=f"http://{LOOPBACK}:{port}", log_path=log_path)
    deadline = time.monotonic() + APP_START_TIMEOUT_S
    while not _answers(f"{process.url}/healthz"):
        if popen.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the app did not start:\n{process.log_tail()}")
        time.sleep(0.1)
    return process


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code in (200, 503)
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def api(
    upstream: ManagedProcess, app_port: int, callback_url: str, log_dir: Path
) -> Iterator[ManagedProcess]:
    assert upstream.url is not None
    env = settings_env(upstream.url, callback_url)
    process = start_app(env, app_port, log_dir / "callbacks-app.log")
    yield process
    process.stop()


@pytest.fixture
def worker(
    upstream: ManagedProcess, api: ManagedProcess, callback_url: str, log_dir: Path
) -> Iterator[ManagedProcess]:
    """One worker for one test (the kill tests need to know which worker sent a job)."""
    assert upstream.url is not None
    name = f"callbacks-{uuid.uuid4().hex[:6]}"
    process = start_worker(
        settings_env(upstream.url, callback_url),
        concurrency=2,
        hostname=f"{name}@%h",
        log_path=log_dir / f"{name}.log",
        extra_args=WORKER_ARGS,
    )
    yield process
    process.stop()


# ----------------------------------------------------------------------------- helpers


def sign(task_id: str, timestamp: int | str, key: str = HMAC_KEY) -> str:
    """kie.ai's signature, written out here (not the receiver's code)."""
    message = f"{task_id}.{timestamp}".encode()
    return base64.b64encode(hmac.new(key.encode(), message, hashlib.sha256).digest()).decode()


def callback_body(task_id: str, state: str) -> bytes:
    data: dict[str, Any] = {"taskId": task_id, "state": state}
    if state == "success":
        data["resultJson"] = json.dumps({"resultUrls": ["https://forged.example.test/x.png"]})
    if state == "fail":
        data.update(failCode="501", failMsg="forged failure")
    return json.dumps({"code": 200, "msg": "success", "data": data}).encode()


def post(
    api: ManagedProcess,
    body: bytes | Any,
    *,
    timestamp: int | str | None = None,
    signature: str | None = None,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> requests.Response:
    sent = {"Content-Type": "application/json", **(headers or {})}
    if timestamp is not None:
        sent["X-Webhook-Timestamp"] = str(timestamp)
    if signature is not None:
        sent["X-Webhook-Signature"] = signature
    return requests.post(
        f"{api.url}/v1/callbacks/kie", data=body, headers=sent, params=params, timeout=10
    )


def metrics(client: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(keys.METRICS).items()}


def refusals(client: redis.Redis) -> dict[str, int]:
    return {k[len(REFUSED) :]: v for k, v in metrics(client).items() if k.startswith(REFUSED)}


def exported_refusals(api: ManagedProcess) -> dict[str, int]:
    """``remixq_callbacks_refused_total`` by reason, as the app's ``/metrics`` shows it."""
    answer = requests.get(f"{api.url}/metrics", timeout=10)
    assert answer.status_code == 200
    found: dict[str, int] = {}
    for family in text_string_to_metric_families(answer.text):
        if family.name == "remixq_callbacks_refused":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    found[sample.labels["reason"]] = int(sample.value)
    return found


def counted(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def shape(response: requests.Response) -> tuple[int, bytes, str | None, str | None]:
    """What a caller can tell from an answer (its date aside)."""
    return (
        response.status_code,
        response.content,
        response.headers.get("content-type"),
        response.headers.get("content-length"),
    )


def enqueue(label: str, seconds: float | None = None) -> tuple[str, str]:
    prompt = unique_prompt(label)
    if seconds is not None:
        prompt += f" [sandbox:seconds={seconds:g}]"
    return enqueue_remix(prompt=prompt, **REMIX_INPUT), prompt  # type: ignore[arg-type]


def with_task(job_id: str) -> JobRecord:
    def ready() -> JobRecord | None:
        record = get_job(job_id)
        return record if record is not None and record.upstream_task_id else None

    return wait_until(ready, JOB_TIMEOUT_S, 0.05)


# ----------------------------------------------------------------------------- the fast path


def test_a_job_finishes_within_a_second_of_its_generation_and_is_never_polled(
    control: SandboxControl, worker: ManagedProcess, redis_client: redis.Redis
) -> None:
    before = metrics(redis_client)
    job_id, prompt = enqueue("callback-fast")

    record = wait_for_job(job_id, timeout=JOB_TIMEOUT_S)

    stats = control.stats()
    assert record.state is JobState.SUCCEEDED and record.result_urls
    assert record.finished_at is not None and record.polls == 0
    # This job's acceptance (a job of an earlier test may be accepted meanwhile).
    accepted_at = min(stats["accepted_at"], key=lambda t: abs(t - (record.submitted_at or 0)))
    generated_at = accepted_at + GENERATION_S
    assert 0 <= record.finished_at - generated_at < CALLBACK_LATENCY_S
    # This job's callback (one of an earlier test's job may come meanwhile), never a poll.
    assert stats["record_requests"] == 0 and stats["callbacks_sent"] >= 1
    assert accepted(control, prompt) == 1
    # At least this job's (an earlier test's job may still finish meanwhile).
    assert counted(before, metrics(redis_client)).get("callbacks_total:valid", 0) >= 1
    assert redis_client.zscore(keys.SCHEDULE, job_id) is None


def test_several_jobs_each_finish_by_their_own_callback(
    control: SandboxControl, worker: ManagedProcess
) -> None:
    jobs = [enqueue(f"callback-many-{i}", seconds=1 + i * 0.5) for i in range(4)]

    records = [wait_for_job(job_id, timeout=JOB_TIMEOUT_S) for job_id, _ in jobs]

    assert [r.state for r in records] == [JobState.SUCCEEDED] * len(jobs)
    assert all(r.polls == 0 for r in records)
    assert control.stats()["record_requests"] == 0
    urls = [r.result_urls[0] for r in records]
    assert all(
        r.upstream_task_id and r.upstream_task_id in u for r, u in zip(records, urls, strict=True)
    )


# ----------------------------------------------------------------------------- refusals


def test_forged_stale_and_replayed_callbacks_get_the_same_401_and_change_nothing(
    control: SandboxControl,
    worker: ManagedProcess,
    api: ManagedProcess,
    redis_client: redis.Redis,
) -> None:
    job_id, _ = enqueue("callback-refused", seconds=30)
    task_id = with_task(job_id).upstream_task_id
    assert task_id
    now = int(time.time())
    # A genuine delivery (signed with the key) of a state that is not final: answered 200.
    genuine = {"timestamp": now, "signature": sign(task_id, now)}
    assert post(api, callback_body(task_id, "generating"), **genuine).status_code == 200
    before_record = get_job(job_id)
    before = refusals(redis_client)
    exported_before = exported_refusals(api)

    answers = {
        "forged": post(
            api, callback_body(task_id, "fail"), timestamp=now, signature=sign(task_id, now, "x")
        ),
        "stale": post(
            api,
            callback_body(task_id, "fail"),
            timestamp=now - WINDOW_S - 10,
            signature=sign(task_id, now - WINDOW_S - 10),
        ),
        "replayed": post(api, callback_body(task_id, "success"), **genuine),
        "unsigned": post(api, callback_body(task_id, "success")),
        "other task": post(
            api,
            callback_body("task_of_nobody", "success"),
            timestamp=now,
            signature=sign("task_of_nobody", now),
            params={"job_id": job_id},
        ),
    }

    assert {name: r.status_code for name, r in answers.items()} == dict.fromkeys(answers, 401)
    assert len({shape(r) for r in answers.values()}) == 1  # never says which check failed
    assert answers["forged"].content == b""
    assert get_job(job_id) == before_record
    # Refusals of a valid signature are the fleet's (Redis); the others, this process's.
    assert counted(before, refusals(redis_client)) == {"replay": 1, "unknown_task": 1}
    assert counted(exported_before, exported_refusals(api)) == {
        "bad_signature": 1,
        "stale": 1,
        "replay": 1,
        "bad_timestamp": 1,
        "unknown_task": 1,
    }
    assert control.stats()["record_requests"] == 0
    # The genuine success comes: the job finishes (and leaves the schedule) as usual.
    later = now + 1
    done = post(
        api, callback_body(task_id, "success"), timestamp=later, signature=sign(task_id, later)
    )
    assert done.status_code == 200 and wait_for_job(job_id, 5).state is JobState.SUCCEEDED


@pytest.mark.parametrize(
    "timestamp",
    [
        "1e10",
        "-5",
        "1700000000.5",
        "0x6553f100",
        "\u0661\u0667\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660",  # Arabic-Indic
        "17000000\u00b2",  # a superscript two, as Latin-1: isdigit() says yes
        "9" * 30,
    ],
)
def test_odd_timestamps_get_401(api: ManagedProcess, timestamp: str) -> None:
    headers = {"X-Webhook-Timestamp": timestamp, "X-Webhook-Signature": sign("t", timestamp)}

    response = requests.post(
        f"{api.url}/v1/callbacks/kie",
        data=callback_body("t", "success"),
        headers={k: _header_bytes(v) for k, v in headers.items()},
        timeout=10,
    )

    assert response.status_code == 401


def _header_bytes(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode()


def test_bodies_over_the_cap_are_refused_counted_or_chunked(
    api: ManagedProcess, redis_client: redis.Redis
) -> None:
    before = refusals(redis_client)
    exported_before = exported_refusals(api)
    big = b'{"data": {"taskId": "' + b"x" * CAP + b'"}}'

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    declared = post(api, big, timestamp=1, signature="x")
    chunked = post(api, chunks(), timestamp=1, signature="x")  # no Content-Length: counted

    assert chunked.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in chunked.request.headers
    assert (declared.status_code, chunked.status_code) == (413, 413)
    assert counted(exported_before, exported_refusals(api)) == {"too_large": 2}
    assert refusals(redis_client) == before


FLOOD = 50


def test_an_unsigned_flood_writes_nothing_to_redis_logs_nothing_and_shows_on_metrics(
    api: ManagedProcess, redis_client: redis.Redis, log_dir: Path
) -> None:
    now, task_id = int(time.time()), "task_flood"
    body = callback_body(task_id, "success")
    noise = {
        "bad_signature": (body, {"X-Webhook-Timestamp": str(now), "X-Webhook-Signature": "x"}),
        "stale": (body, {"X-Webhook-Timestamp": str(now - WINDOW_S - 5)}),
        "bad_timestamp": (body, {"X-Webhook-Timestamp": "soon"}),
        "malformed": (b"{", {"X-Webhook-Timestamp": str(now)}),
    }
    log = log_dir / "callbacks-app.log"
    logged_before = log.read_text().count("callback refused")
    exported_before = exported_refusals(api)
    keys_before, stored_before = set(redis_client.scan_iter()), metrics(redis_client)
    writes_before = write_commands(redis_client)

    with requests.Session() as session:
        answers = [
            session.post(f"{api.url}/v1/callbacks/kie", data=data, headers=headers, timeout=10)
            for data, headers in noise.values()
            for _ in range(FLOOD)
        ]

    assert [a.status_code for a in answers] == [401] * len(noise) * FLOOD
    assert write_commands(redis_client) == writes_before
    # No key written (keys of earlier jobs' budget may expire meanwhile).
    assert set(redis_client.scan_iter()) <= keys_before
    assert metrics(redis_client) == stored_before
    assert counted(exported_before, exported_refusals(api)) == dict.fromkeys(noise, FLOOD)
    assert log.read_text().count("callback refused") == logged_before
    # A refusal of a valid signature still counts in Redis, and shows on /metrics too.
    unknown = "task_of_nobody_flood"
    signed = post(
        api, callback_body(unknown, "success"), timestamp=now, signature=sign(unknown, now)
    )
    assert signed.status_code == 401
    assert counted(stored_before, metrics(redis_client)) == {REFUSED + "unknown_task": 1}
    assert counted(exported_before, exported_refusals(api))["unknown_task"] == 1


def test_a_signed_callback_naming_a_huge_job_id_is_refused(
    api: ManagedProcess, redis_client: redis.Redis
) -> None:
    now = int(time.time())
    before = refusals(redis_client)

    response = post(
        api,
        callback_body("task_unknown_huge", "success"),
        timestamp=now,
        signature=sign("task_unknown_huge", now),
        params={"job_id": "j" * 10_000},
    )

    assert response.status_code == 401
    assert counted(before, refusals(redis_client)) == {"unknown_task": 1}


def test_with_redis_down_a_callback_gets_503_and_no_secret(
    upstream: ManagedProcess, callback_url: str, log_dir: Path
) -> None:
    """An app whose Redis is away cannot tell a replay from a first delivery: 503, so the
    upstream delivers it again, never a 401 that would drop a genuine callback."""
    assert upstream.url is not None
    dead = f"redis://{LOOPBACK}:{free_port()}/0"
    env = settings_env(upstream.url, callback_url, REDIS_URL=dead, RESULT_BACKEND_URL=dead)
    port = free_port()
    log_path = log_dir / "callbacks-app-no-redis.log"
    process = start_app(env, port, log_path)
    try:
        now = int(time.time())
        response = requests.post(
            f"http://{LOOPBACK}:{port}/v1/callbacks/kie",
            data=callback_body("task_x", "success"),
            headers={"X-Webhook-Timestamp": str(now), "X-Webhook-Signature": sign("task_x", now)},
            params={"job_id": "some-job"},
            timeout=30,
        )
    finally:
        process.stop()

    assert response.status_code == 503
    assert HMAC_KEY not in response.text and HMAC_KEY not in log_path.read_text()


# ----------------------------------------------------------------------------- a worker killed


def _kill_right_after_acceptance(
    control: SandboxControl,
    upstream: ManagedProcess,
    callback_url: str,
    log_dir: Path,
    seconds: float,
    **survivor_settings: str,
) -> tuple[str, str, ManagedProcess]:
    """Enqueue a job, let one worker send it, SIGKILL that worker while the sandbox answers
    createTask (the task exists, the answer is trickled a byte a second), then start a
    worker that could send the job again. ``(job_id, prompt, survivor)``."""
    assert upstream.url is not None
    control.configure(trickle_rate=1.0, trickle_seconds=1.0, fault_endpoints=["createTask"])
    name = f"victim-{uuid.uuid4().hex[:6]}"
    victim = start_worker(
        settings_env(upstream.url, callback_url),
        concurrency=1,
        hostname=f"{name}@%h",
        log_path=log_dir / f"{name}.log",
        extra_args=WORKER_ARGS,
    )
    try:
        job_id, prompt = enqueue("callback-kill", seconds=seconds)
        wait_until(lambda: accepted(control, prompt) == 1, JOB_TIMEOUT_S, 0.01)
    finally:
        victim.kill()
        control.configure(trickle_rate=0.0)
    assert victim.log_path is not None
    assert f"remix.submit[{job_id}] received" in victim.log_path.read_text()
    record = get_job(job_id)
    assert record is not None and record.upstream_task_id is None
    assert record.attempt_started_at is not None  # the attempt the victim opened stays open
    name = f"survivor-{uuid.uuid4().hex[:6]}"
    survivor = start_worker(
        settings_env(upstream.url, callback_url, **survivor_settings),
        concurrency=1,
        hostname=f"{name}@%h",
        log_path=log_dir / f"{name}.log",
        extra_args=WORKER_ARGS,
    )
    return job_id, prompt, survivor


def test_a_worker_killed_mid_create_task_pays_once_the_callback_adopts_the_task(
    control: SandboxControl,
    upstream: ManagedProcess,
    api: ManagedProcess,
    callback_url: str,
    log_dir: Path,
) -> None:
    job_id, prompt, survivor = _kill_right_after_acceptance(
        control, upstream, callback_url, log_dir, seconds=3
    )
    try:
        record = wait_for_job(job_id, timeout=JOB_TIMEOUT_S)
    finally:
        survivor.stop()

    assert record.state is JobState.SUCCEEDED and record.result_urls
    assert (create_requests(control, prompt), accepted(control, prompt)) == (1, 1)
    assert not record.possibly_paid_twice and record.extra_task_ids == []
    assert record.unknown_outcomes == 0 and record.submit_attempts == 1
    assert control.stats()["record_requests"] == 1  # the adoption's one confirmation


def test_a_lost_answer_waits_for_the_callback_instead_of_paying_again(
    control: SandboxControl,
    upstream: ManagedProcess,
    api: ManagedProcess,
    callback_url: str,
    log_dir: Path,
    redis_client: redis.Redis,
) -> None:
    """The generation outlasts the attempt's settling (lease 16 s + 30 s with a 1 s request
    deadline): the attempt is counted unknown, the job is due to be sent again, and waits
    for the callback (REMIX_CALLBACK_WAIT_S = 600) that then adopts the task."""
    job_id, prompt, survivor = _kill_right_after_acceptance(
        control, upstream, callback_url, log_dir, seconds=60, KIE_REQUEST_DEADLINE_S="1"
    )
    try:
        unknown = wait_until(
            lambda: (r := get_job(job_id)) is not None and r.unknown_outcomes == 1 and r,
            JOB_TIMEOUT_S,
            0.5,
        )
        assert unknown.state is JobState.QUEUED and unknown.upstream_task_id is None
        # Due to be sent again, it waits for a callback instead.
        wait_until(
            lambda: (redis_client.zscore(keys.SCHEDULE, job_id) or 0) > time.time() + 300,
            10,
        )
        assert accepted(control, prompt) == 1
        record = wait_for_job(job_id, timeout=JOB_TIMEOUT_S)
    finally:
        survivor.stop()

    assert record.state is JobState.SUCCEEDED and record.result_urls
    assert (create_requests(control, prompt), accepted(control, prompt)) == (1, 1)
    assert record.unknown_outcomes == 1 and record.submit_attempts == 1
    assert not record.possibly_paid_twice and record.extra_task_ids == []


# ----------------------------------------------------------------------------- secrets


def test_no_secret_in_the_app_log_the_worker_logs_or_redis(
    log_dir: Path, redis_client: redis.Redis, api: ManagedProcess
) -> None:
    """Runs last in this module: every log its processes wrote so far."""
    logs = [p for p in log_dir.iterdir() if p.name.startswith(("callbacks", "victim", "survivor"))]
    assert any(p.name == "callbacks-app.log" for p in logs)
    for secret in (HMAC_KEY, SECRET_API_KEY):
        for path in logs:
            assert secret not in path.read_text(errors="replace"), path.name
        for key in redis_client.scan_iter(count=1000):
            kind = redis_client.type(key)
            if kind == b"hash":
                values = b" ".join(redis_client.hvals(key))
            elif kind == b"string":
                values = redis_client.get(key) or b""
            else:
                continue
            assert secret.encode() not in values, key
    openapi = requests.get(f"{api.url}/openapi.json", timeout=10).text
    assert HMAC_KEY not in openapi and SECRET_API_KEY not in openapi
