"""Edges of the HTTP app and of the webhook URL check, found by a hostile review.

Non-ASCII requests at the body caps, a non-ASCII idempotency key in the header, loopback
and private addresses in numeric shorthand or IPv6 translations, and a long poll across a
short Redis restart.

Real parts only: real Redis (REMIXQ_TEST_REDIS_URL; a private ``redis-server`` for the
restart test) and real ``uvicorn producers.http:app`` subprocesses. No workers are needed:
every finding is in the HTTP app or the webhook URL check.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from producers import cancel_job
from sandbox.launch import ManagedProcess, free_port, start_api, start_redis
from tests.conftest import REMIX_INPUT, TEST_REDIS_URL
from worker.net.outbound import Guard, Refused, check_url

pytestmark = pytest.mark.integration


def app_env(**overrides: str) -> dict[str, str | None]:
    env: dict[str, str | None] = {
        "REDIS_URL": TEST_REDIS_URL,
        "RESULT_BACKEND_URL": TEST_REDIS_URL,
        "KIE_API_KEY": f"sk-review-{uuid.uuid4().hex}",
        "REMIX_API_TOKENS": None,  # unset (set, it must hold a token)
        "KIE_CALLBACK_URL": "",
        "REMIX_NOTIFY_ALLOW_PRIVATE": "0",
    }
    env.update(overrides)
    return env


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    log = tmp_path_factory.mktemp("review") / "api.log"
    process = start_api(app_env(), log_path=log)
    yield process
    process.stop()


@pytest.fixture
def client(api: ManagedProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=str(api.url), timeout=60) as http:
        yield http


def body(prompt: str, **fields: Any) -> dict[str, Any]:
    return {"prompt": prompt, **REMIX_INPUT, **fields}


# ------------------------------------------------------------------ 1. body caps


def test_a_valid_single_job_with_a_non_ascii_prompt_is_not_refused_413(
    client: httpx.Client,
) -> None:
    """5,000-character prompt + 500-character negative prompt, as json.dumps sends them
    (ensure_ascii: an astral character is 12 bytes): 66 KB > JOB_BODY_MAX (64 KiB)."""
    job = body("\U0001f600" * 5000, negative_prompt="\U0001f600" * 500)
    raw = json.dumps(job).encode()
    answer = client.post("/v1/jobs", content=raw, headers={"content-type": "application/json"})
    assert answer.status_code == 202, (answer.status_code, answer.text[:200], len(raw))


def test_a_batch_of_1000_valid_non_ascii_prompts_is_not_refused_413(client: httpx.Client) -> None:
    """1,000 prompts of 5,000 CJK characters, plain UTF-8: 15 MB > BATCH_BODY_MAX (8 MiB);
    the docstring's "about 5.3 MB" assumes ASCII prompts."""
    jobs = [body("画" * 5000) for _ in range(1000)]
    raw = json.dumps({"jobs": jobs}, ensure_ascii=False).encode()
    answer = client.post(
        "/v1/jobs:batch", content=raw, headers={"content-type": "application/json"}
    )
    # 422 would be acceptable too (validation); 413 refuses a legitimate body by its size.
    assert answer.status_code != 413, (answer.text[:200], len(raw))
    # No 1,000 queued jobs left behind: the next module's workers on this Redis would spend
    # longer than its jobs' submit deadline failing them first.
    for job in answer.json().get("jobs", []) if answer.status_code == 202 else []:
        cancel_job(job["job_id"])


# ------------------------------------------------------------------ 2. Idempotency-Key header


def test_the_same_non_ascii_key_in_header_and_body_is_one_key(client: httpx.Client) -> None:
    key = f"clé-{uuid.uuid4().hex}"
    answer = client.post(
        "/v1/jobs",
        json=body(f"review idem both {key}", idempotency_key=key),
        headers={"Idempotency-Key": key.encode()},  # UTF-8 bytes on the wire
    )
    assert answer.status_code == 202, answer.text  # observed: 422 "differs from the body's"


def test_a_retry_moving_a_non_ascii_key_from_header_to_body_finds_the_same_job(
    client: httpx.Client,
) -> None:
    key = f"clé-{uuid.uuid4().hex}"
    prompt = f"review idem move {key}"
    first = client.post("/v1/jobs", json=body(prompt), headers={"Idempotency-Key": key.encode()})
    assert first.status_code == 202, first.text
    again = client.post("/v1/jobs", json=body(prompt, idempotency_key=key))
    # observed: 202 and a second job (a second createTask will be paid)
    assert (again.status_code, again.json()["job_id"]) == (200, first.json()["job_id"])


# ------------------------------------------------------------------ 3. notify_url at enqueue


@pytest.mark.parametrize(
    "url", ["http://127.1/hook", "http://2130706433/hook", "http://0/hook", "http://0x7f.1/hook"]
)
def test_a_loopback_notify_url_as_written_is_refused_at_enqueue(
    client: httpx.Client, url: str
) -> None:
    """README: loopback addresses are refused "at enqueue for an address as written"."""
    answer = client.post(
        "/v1/jobs", json=body(f"review ssrf {url} {uuid.uuid4().hex}", notify_url=url)
    )
    assert answer.status_code == 422, (answer.status_code, answer.text[:200])


# ------------------------------------------------------------------ 4. translated addresses


@pytest.mark.parametrize(
    "host",
    [
        "[64:ff9b::a9fe:a9fe]",  # NAT64 (RFC 6052) of 169.254.169.254
        "[::ffff:0:a9fe:a9fe]",  # SIIT / IPv4-translated of 169.254.169.254
        "[2002:a9fe:a9fe::1]",  # 6to4 of 169.254.169.254
        "[::169.254.169.254]",  # IPv4-compatible (deprecated)
        "[64:ff9b::7f00:1]",  # NAT64 of 127.0.0.1
    ],
)
def test_translated_forms_of_private_addresses_are_refused(host: str) -> None:
    url = f"http://{host}/latest/meta-data/"
    with pytest.raises(Refused):
        check_url(url, allow_private=False)
    with pytest.raises(Refused):
        Guard().resolve(url)


# ------------------------------------------------------------------ 5. long poll vs Redis restart


def test_a_long_poll_rides_out_a_short_redis_restart(tmp_path: Path) -> None:
    """The watch reconnects, but the waiter's own re-read raises and the poll answers 503
    after ~3.5 s of a 4 s restart; expected: the request keeps waiting (200 at the end)."""
    port = free_port()
    data = tmp_path / "aof"
    data.mkdir()
    server = start_redis(port, append_only_dir=data)
    url = f"redis://127.0.0.1:{port}/0"
    api = start_api(app_env(REDIS_URL=url, RESULT_BACKEND_URL=url), log_path=tmp_path / "api.log")
    try:
        with httpx.Client(base_url=str(api.url), timeout=60) as http:
            job_id = http.post("/v1/jobs", json=body("review longpoll restart")).json()["job_id"]
            result: dict[str, Any] = {}

            def wait() -> None:
                answer = http.get(f"/v1/jobs/{job_id}", params={"wait": 12})
                result["status"] = answer.status_code

            waiter = threading.Thread(target=wait)
            waiter.start()
            time.sleep(1)
            server.process.stop()
            time.sleep(4)
            server = start_redis(port, append_only_dir=data)
            waiter.join(30)
            assert result.get("status") == 200, result
    finally:
        api.stop()
        server.process.stop()
