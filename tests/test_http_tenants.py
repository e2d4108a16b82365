"""Tenants over HTTP: real uvicorn and Redis, tokens that name tenants, no worker.

Every route is scoped to the token's tenant: another tenant's job answers exactly like an
unknown one (at once, for a long poll too); idempotency keys are per tenant; a body may
not name a tenant; ``priority`` is taken or refused whole; a tenant at
``REMIX_TENANT_MAX_WAITING`` gets ``429`` with ``Retry-After`` and nothing is written,
while another tenant goes on. No worker runs, so every job stays ``queued``; each test's
jobs are cancelled after it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from producers import enqueue_remix
from sandbox.images import render_png
from sandbox.launch import ManagedProcess, start_api
from tests.conftest import REMIX_INPUT, TEST_REDIS_URL, unique_prompt
from worker import keys

pytestmark = pytest.mark.integration
RUN = uuid.uuid4().hex[:8]
#: Tenants of this module's run (so no other module's jobs count against their limit).
A, B, C = f"svc-a-{RUN}", f"svc-b-{RUN}", f"svc-c-{RUN}"
TOKENS = {name: f"tok-{name}-SECRET-{uuid.uuid4().hex}" for name in (A, B, C)}
BARE_TOKEN = f"tok-bare-SECRET-{uuid.uuid4().hex}"
MAX_WAITING = 3
LONG_POLL_S = 20
IMAGE = render_png("http-tenants", 0, "tenants", "square")


def app_env(**overrides: str | None) -> dict[str, str | None]:
    env: dict[str, str | None] = {
        "REDIS_URL": TEST_REDIS_URL,
        "RESULT_BACKEND_URL": TEST_REDIS_URL,
        "REMIX_API_TOKENS": None,
        "REMIX_TENANT_MAX_WAITING": None,
        "KIE_CALLBACK_URL": "",
        "KIE_RATE_LIMIT": "20/10s",
    }
    env.update(overrides)
    return env


@pytest.fixture(scope="module")
def api(redis_client: redis.Redis, log_dir: Path) -> Iterator[ManagedProcess]:
    tokens = ",".join([*(f"{name}:{token}" for name, token in TOKENS.items()), BARE_TOKEN])
    env = app_env(REMIX_API_TOKENS=tokens, REMIX_TENANT_MAX_WAITING=str(MAX_WAITING))
    process = start_api(env, log_path=log_dir / "http-tenants.log")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def open_api(redis_client: redis.Redis, log_dir: Path) -> Iterator[ManagedProcess]:
    """An app without tokens: every caller is the default tenant."""
    process = start_api(app_env(), log_path=log_dir / "http-tenants-open.log")
    yield process
    process.stop()


@pytest.fixture
def clients(api: ManagedProcess) -> Iterator[dict[str, httpx.Client]]:
    """A client per tenant (``default``: the bare token's); their queued jobs are
    cancelled after the test."""
    tokens = {**TOKENS, "default": BARE_TOKEN}
    made = {
        name: httpx.Client(base_url=str(api.url), timeout=LONG_POLL_S + 10, headers=bearer(token))
        for name, token in tokens.items()
    }
    yield made
    for http in made.values():
        for record in http.get("/v1/jobs", params={"state": "queued", "limit": 1000}).json()[
            "jobs"
        ]:
            http.post(f"/v1/jobs/{record['job_id']}/cancel")
        http.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def job_body(prompt: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"prompt": prompt or unique_prompt("tenants"), **REMIX_INPUT, **fields}


def enqueued(http: httpx.Client, **fields: Any) -> dict[str, Any]:
    answer = http.post("/v1/jobs", json=job_body(**fields))
    assert answer.status_code == 202, answer.text
    record: dict[str, Any] = answer.json()
    return record


def written(client: redis.Redis) -> tuple[int, int]:
    """The job records and blobs in Redis."""
    return (
        len(list(client.scan_iter(keys.JOB_PREFIX + "*"))),
        len(list(client.scan_iter(keys.blob("*")))),
    )


# ------------------------------------------------------------------ scoped to the tenant


def test_the_record_names_the_tokens_tenant_and_the_bodys_priority(
    clients: dict[str, httpx.Client],
) -> None:
    record = enqueued(clients[A], priority="interactive")
    plain = enqueued(clients["default"])

    assert (record["tenant"], record["priority"]) == (A, "interactive")
    assert (plain["tenant"], plain["priority"]) == ("default", "normal")
    assert clients[A].get(f"/v1/jobs/{record['job_id']}").json() == record


def test_another_tenants_job_answers_exactly_like_an_unknown_one(
    clients: dict[str, httpx.Client],
) -> None:
    job_id = enqueued(clients[A])["job_id"]
    unknown = uuid.uuid4().hex

    for path in ("/v1/jobs/{}", "/v1/jobs/{}?wait=1"):
        theirs = clients[B].get(path.format(job_id))
        nobodys = clients[B].get(path.format(unknown))
        assert (theirs.status_code, theirs.json()) == (404, nobodys.json())
    theirs = clients[B].post(f"/v1/jobs/{job_id}/cancel")
    nobodys = clients[B].post(f"/v1/jobs/{unknown}/cancel")
    assert (theirs.status_code, theirs.json()) == (404, nobodys.json())
    assert clients["default"].get(f"/v1/jobs/{job_id}").status_code == 404

    record = clients[A].get(f"/v1/jobs/{job_id}").json()
    assert record["state"] == "queued"  # B's cancel did nothing
    assert clients[A].post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "cancelled"


def test_a_long_poll_for_another_tenants_job_answers_404_at_once(
    clients: dict[str, httpx.Client],
) -> None:
    job_id = enqueued(clients[A])["job_id"]

    started = time.monotonic()
    answer = clients[B].get(f"/v1/jobs/{job_id}", params={"wait": LONG_POLL_S})
    elapsed = time.monotonic() - started

    assert answer.status_code == 404 and answer.json() == {"detail": "no such job"}
    assert elapsed < 3, f"the wrong tenant waited {elapsed:.1f} s"


def test_each_tenant_lists_only_its_own_jobs(clients: dict[str, httpx.Client]) -> None:
    mine = [enqueued(clients[A])["job_id"] for _ in range(2)]
    theirs = enqueued(clients[B])["job_id"]

    def listed(tenant: str) -> list[str]:
        page = clients[tenant].get("/v1/jobs", params={"state": "queued"}).json()
        assert {record["tenant"] for record in page["jobs"]} <= {tenant}
        return [record["job_id"] for record in page["jobs"]]

    assert listed(A) == mine
    assert listed(B) == [theirs]
    assert not {*mine, theirs} & set(listed("default"))


def test_idempotency_keys_are_per_tenant(clients: dict[str, httpx.Client]) -> None:
    body = job_body(idempotency_key=f"order-{uuid.uuid4().hex}")

    a = clients[A].post("/v1/jobs", json=body)
    b = clients[B].post("/v1/jobs", json=body)
    a_again = clients[A].post("/v1/jobs", json=body)
    b_batch = clients[B].post("/v1/jobs:batch", json={"jobs": [body]})

    assert (a.status_code, b.status_code, a_again.status_code) == (202, 202, 200)
    assert b.json()["job_id"] != a.json()["job_id"]
    assert b.json()["tenant"] == B and "result_urls" in b.json()
    assert a_again.json()["job_id"] == a.json()["job_id"]
    assert b_batch.status_code == 200 and b_batch.json()["jobs"][0]["job_id"] == b.json()["job_id"]


def test_the_same_key_with_another_priority_is_another_request(
    clients: dict[str, httpx.Client],
) -> None:
    body = job_body(idempotency_key=f"prio-{uuid.uuid4().hex}")
    assert clients[A].post("/v1/jobs", json=body).status_code == 202

    again = clients[A].post("/v1/jobs", json={**body, "priority": "bulk"})

    assert again.status_code == 409


def test_a_body_that_names_a_tenant_is_refused(
    clients: dict[str, httpx.Client], redis_client: redis.Redis
) -> None:
    before = written(redis_client)

    one = clients[A].post("/v1/jobs", json=job_body(tenant=B))
    batch = clients[A].post("/v1/jobs:batch", json={"jobs": [job_body(), job_body(tenant=A)]})
    upload = clients[A].post(
        "/v1/jobs:upload",
        data={
            "request": json.dumps(
                {"prompt": "x", "reference_image_urls": ["https://e.test/r"], "tenant": A}
            )
        },
        files=[("image_file", ("me.png", IMAGE, "image/png"))],
    )

    for answer, loc in (
        (one, ["body", "tenant"]),
        (batch, ["body", "jobs", 1, "tenant"]),
        (upload, ["body", "request", "tenant"]),
    ):
        assert answer.status_code == 422, answer.text
        [error] = answer.json()["detail"]
        assert error["loc"] == loc and "comes from the bearer token" in error["msg"]
        assert "\n" not in answer.text
    assert written(redis_client) == before


@pytest.mark.parametrize("priority", ["urgent", "", "Normal", 1, None])
def test_a_bad_priority_is_refused_in_one_line_and_nothing_is_written(
    clients: dict[str, httpx.Client], redis_client: redis.Redis, priority: Any
) -> None:
    before = written(redis_client)

    answer = clients[A].post("/v1/jobs", json=job_body(priority=priority))

    assert answer.status_code == 422
    [error] = answer.json()["detail"]
    assert error["loc"] == ["body", "priority"] and "\n" not in answer.text
    assert written(redis_client) == before


def test_an_unknown_priority_in_a_batch_refuses_the_whole_batch(
    clients: dict[str, httpx.Client], redis_client: redis.Redis
) -> None:
    before = written(redis_client)
    jobs = [job_body(priority="bulk"), job_body(priority="urgent"), job_body()]

    answer = clients[A].post("/v1/jobs:batch", json={"jobs": jobs})

    assert answer.status_code == 422
    [error] = answer.json()["detail"]
    assert error["loc"] == ["body", "jobs", 1, "priority"]
    assert written(redis_client) == before


def test_batch_items_and_uploads_carry_their_priorities(clients: dict[str, httpx.Client]) -> None:
    jobs = [job_body(priority="bulk"), job_body(), job_body(priority="interactive")]
    request = {"prompt": "up", "reference_image_urls": ["https://e.test/r"], "priority": "bulk"}

    batch = clients[B].post("/v1/jobs:batch", json={"jobs": jobs}).json()["jobs"]
    upload = clients[A].post(
        "/v1/jobs:upload",
        data={"request": json.dumps(request)},
        files=[("image_file", ("me.png", IMAGE, "image/png"))],
    )

    assert [r["priority"] for r in batch] == ["bulk", "normal", "interactive"]
    assert {r["tenant"] for r in batch} == {B}
    assert upload.status_code == 202, upload.text
    assert (upload.json()["tenant"], upload.json()["priority"]) == (A, "bulk")


# ------------------------------------------------------------------ admission control


def test_a_tenant_at_its_limit_gets_429_with_retry_after_and_nothing_is_written(
    clients: dict[str, httpx.Client], redis_client: redis.Redis
) -> None:
    for priority in ("bulk", "normal", "interactive"):
        enqueued(clients[C], priority=priority)
    before = written(redis_client)

    answers = [
        clients[C].post("/v1/jobs", json=job_body(priority="interactive")),
        clients[C].post("/v1/jobs:batch", json={"jobs": [job_body()]}),
        clients[C].post(
            "/v1/jobs:upload",
            data={
                "request": json.dumps({"prompt": "x", "reference_image_urls": ["https://e.test/r"]})
            },
            files=[("image_file", ("me.png", IMAGE, "image/png"))],
        ),
    ]

    for answer in answers:
        assert answer.status_code == 429, answer.text
        assert 1 <= int(answer.headers["Retry-After"]) <= 60
        detail = answer.json()["detail"]
        assert C in detail and "REMIX_TENANT_MAX_WAITING" in detail and "\n" not in detail
    assert written(redis_client) == before  # no record, and the upload's blob is gone too
    assert enqueued(clients[A])["tenant"] == A  # another tenant is not affected


def test_a_batch_that_would_pass_the_limit_is_refused_whole(
    clients: dict[str, httpx.Client], redis_client: redis.Redis
) -> None:
    enqueued(clients[C])
    before = written(redis_client)

    refused = clients[C].post("/v1/jobs:batch", json={"jobs": [job_body() for _ in range(3)]})

    assert refused.status_code == 429 and written(redis_client) == before
    assert refused.headers["Retry-After"] == "1"  # one job over, at 2 sends a second
    fits = clients[C].post("/v1/jobs:batch", json={"jobs": [job_body() for _ in range(2)]})
    assert fits.status_code == 202


def test_room_comes_back_when_a_waiting_job_is_cancelled(clients: dict[str, httpx.Client]) -> None:
    jobs = [enqueued(clients[C])["job_id"] for _ in range(MAX_WAITING)]
    assert clients[C].post("/v1/jobs", json=job_body()).status_code == 429

    assert clients[C].post(f"/v1/jobs/{jobs[0]}/cancel").status_code == 200

    assert clients[C].post("/v1/jobs", json=job_body()).status_code == 202


# ------------------------------------------------------------------ without tokens


def test_without_tokens_every_caller_is_the_default_tenant(open_api: ManagedProcess) -> None:
    named = enqueue_remix(prompt=unique_prompt("tenants-open"), tenant=A, **REMIX_INPUT)  # type: ignore[arg-type]
    with httpx.Client(base_url=str(open_api.url), timeout=30) as http:
        record = http.post("/v1/jobs", json=job_body()).json()
        try:
            listed = http.get("/v1/jobs", params={"state": "queued", "limit": 1000}).json()
            assert record["tenant"] == "default"
            assert http.get(f"/v1/jobs/{named}").status_code == 404
            assert named not in {r["job_id"] for r in listed["jobs"]}
            assert record["job_id"] in {r["job_id"] for r in listed["jobs"]}
        finally:
            http.post(f"/v1/jobs/{record['job_id']}/cancel")
