"""Attack findings on the fair scheduler and tenant isolation: each test failed on the
code it was found in (merge 1e8c5e1) and passes since its finding was fixed.

Real Redis throughout (the policy database, or the main one with real worker processes
and uvicorn); the sandbox on 127.0.0.1. What each test shows:

1. A job whose provider no live worker has settings for waits in its line until its submit
   deadline (24 h by default) instead of failing ``provider_not_configured`` at once: no
   dispatcher picks that provider's lines, and the schedule holds the job only as a
   backstop at the deadline.
2. A batch no larger than the free moments is granted at once, as a burst: an
   ``interactive`` job arriving right after it waits until the burst leaves the window
   (``limit`` periods), not "at most one period".
3. Moments granted and given back unused (two dispatchers that read the same count) still
   push the pace: a backlog that arrives later waits periods for its first moment while
   most of the budget is free.
4. ``REMIX_TENANT_WEIGHTS`` takes any finite weight above 0: a tiny one lifts the class's
   pass where adding 1 changes nothing, and from then on equal tenants no longer take
   turns: the first by name takes every moment. The passes live in Redis without a TTL,
   so removing the weight does not heal it.
5. A pause that ends (``remixq resume``) between a submit step's look at the pause and its
   ``hold``: the job is held and parked for the pause's recheck (60 s for an operator's
   pause, up to 300 s for a probe), out of its line, although the key is usable.
6. A picked job whose message a worker without its provider's settings takes is parked
   with its grant dropped, not given back: the key's moment stays taken for 5 s, and with
   a small budget every other job waits although nothing was sent.
7. ``/metrics`` answers any tenant's token with every tenant's name and line (jobs waiting,
   sends per minute, share of the key): a tenant learns which other services exist and
   how busy they are.
8. ``POST /v1/jobs:upload`` takes ``"tenant": null`` (and ``"priority": null``) in its
   ``request`` part, which ``POST /v1/jobs`` refuses with ``422``.
9. A tenant's listing trusts its index and never looks at the record's tenant: a job id a
   Celery producer names (``remix.submit`` with ``job_id``) and another tenant used before
   (its record expired, its index entry not yet pruned) shows the new tenant's job, with
   its results, in the old tenant's ``GET /v1/jobs?state=``.
10. A hold after an upstream 429 (``Retry-After``, up to 300 s) tells every dispatcher not
    to ask for moments until it ends; ``remixq resume`` clears the hold but not what the
    dispatchers were told: the jobs in line wait out the old hold anyway.
11. While the key is rotated (operations.md: workers rolled one at a time, each with its
    own key's budget), a job picked with the old key's moment whose message a worker of the
    new key takes is thrown back to its line, and the old key's moment stays taken for 5 s:
    during a rotation about every other pick is wasted.
12. design.md: a hold after a 429 "voids the moments granted before it"; a moment granted
    before the hold is still used once the hold ends (it is refused only during it).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from producers import wait_for_job
from sandbox.images import render_png
from sandbox.launch import ManagedProcess, start_api
from sandbox.server import SandboxServer
from tests.conftest import REMIX_INPUT, TEST_REDIS_URL, StartWorkers, unique_prompt
from tests.policy_kit import enqueue_lined, make_services, pick_next, pick_now, tenant_of
from tests.relay_kit import RELAY, RELAY_API_KEY, enqueue_relay_job
from worker import keys
from worker.app import services
from worker.fleet.dispatcher import Dispatcher
from worker.fleet.picker import Picker
from worker.models import JobState
from worker.policies.gates import resume_key
from worker.policies.submit import submit_step
from worker.services import Services

RUN = uuid.uuid4().hex[:8]


def send_all(svc: Services, job_ids: list[str]) -> None:
    """The picked jobs' steps use their moments (as their createTask goes out)."""
    for job_id in job_ids:
        grant = svc.store.get_internal(job_id, "_grant")
        assert grant is not None and svc.limiter.consume(grant)


def seconds_until_picked(svc: Services, job_id: str | None, limit_s: float) -> float:
    """Dispatcher rounds (a fresh picker each, as a worker asks whenever jobs wait) until
    ``job_id`` (or, with None, any job) gets a moment; ``limit_s`` + 1 when none did."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        picked = [d.job_id for d in pick_now(svc)]
        if picked and (job_id is None or job_id in picked):
            return time.monotonic() - started
        time.sleep(0.01)
    return limit_s + 1


# ------------------------------------------------------------------ 2. a burst


@pytest.mark.policy
def test_attack_an_interactive_job_waits_a_window_behind_a_bulk_burst(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = make_services(upstream.url, kie_rate_limit="10/2s")  # one moment per 0.2 s
    period = svc.limiter.period
    bulk = enqueue_lined(svc, "batcher", "bulk", 9)
    burst = [d.job_id for d in pick_now(svc)]  # the key was idle: all nine at once
    assert burst == bulk
    send_all(svc, burst)

    (urgent,) = enqueue_lined(svc, "web", "interactive")
    waited = seconds_until_picked(svc, urgent, 4.0)

    # tenants.md: a bulk batch holds no place an interactive job must wait behind;
    # design.md: a job that arrives later waits at most one period.
    assert waited <= 3 * period, (
        f"interactive job waited {waited:.2f}s = {waited / period:.0f} periods"
    )


# ------------------------------------------------------------------ 3. the pace


@pytest.mark.policy
def test_attack_moments_given_back_still_push_the_pace(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = make_services(upstream.url, kie_rate_limit="10/2s")  # one moment per 0.2 s
    period = svc.limiter.period
    first = enqueue_lined(svc, "t", n=3)
    # Three dispatchers read the lines' count (3) in the same round, then each asks.
    waiting = svc.lines.waiting(["kie"])["kie"]
    pickers = [Picker(make_services(upstream.url, kie_rate_limit="10/2s")) for _ in range(3)]
    picked = [d.job_id for p in pickers for d in p.pick("kie", waiting)]
    assert picked == first  # the other two pickers gave their moments back
    send_all(svc, picked)

    enqueue_lined(svc, "t", n=30)  # a backlog: 30 waiting, 7 of the 10 moments free
    waited = seconds_until_picked(svc, None, 4.0)

    # Three sends push the pace three periods at most; six given back push it six more.
    assert waited <= 4 * period, (
        f"first paced moment after {waited:.2f}s ({waited / period:.0f} periods)"
    )


# ------------------------------------------------------------------ 4. weights


@pytest.mark.policy
def test_attack_a_tiny_weight_ends_equal_turns_for_good(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    """A weight of 1e-16 lifted its class's pass beyond what a float can add 1 to, and
    from then on the tenant first by name took every moment: such weights are refused."""
    with pytest.raises(ValueError, match=r"the weight must be a number from 0\.01 to 100"):
        make_services(upstream.url, remix_tenant_weights="archive=1e-16")
    svc = make_services(upstream.url, remix_tenant_weights="archive=0.01")
    enqueue_lined(svc, "archive", n=2)
    assert len(pick_next(svc, 2)) == 2  # alone in its class: its pass becomes the class's
    enqueue_lined(svc, "a", n=10)
    enqueue_lined(svc, "b", n=10)

    turns = Counter(tenant_of(svc, j) for j in pick_next(svc, 10))
    assert turns == {"a": 5, "b": 5}, turns


# ------------------------------------------------------------------ 5. a pause ends


@pytest.mark.policy
def test_attack_a_pause_ending_during_a_step_strands_its_job_outside_its_line(
    policy_redis: redis.Redis, upstream: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = make_services(upstream.url)
    (job_id,) = enqueue_lined(svc, "a")
    (picked,) = pick_now(svc)
    svc.pause.pause_by_operator("maintenance")
    hold = svc.store.hold

    def resume_then_hold(api_key_id: str, held_id: str) -> None:
        # Another process: `remixq resume`, just after this step saw the pause.
        resume_key(svc.store, svc.pause, svc.limiter, svc.api_key_id, 600.0)
        hold(api_key_id, held_id)

    monkeypatch.setattr(svc.store, "hold", resume_then_hold)
    assert submit_step(svc, job_id, picked.token) == "pause"
    monkeypatch.undo()
    assert svc.pause.state() is None  # the key is usable

    waited = seconds_until_picked(svc, job_id, 5.0)
    due_in = (svc.store.scheduled(job_id) or 0) - svc.clock.now()
    assert waited <= 5.0, (
        f"not in its line after the resume (_line={svc.store.get_internal(job_id, '_line')}); "
        f"the schedule hands it out in {due_in:.0f}s"
    )


# ------------------------------------------------------------------ 6. provider elsewhere


@pytest.mark.policy
def test_attack_a_message_taken_by_a_worker_of_another_provider_keeps_the_keys_moment(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    kie = make_services(upstream.url, kie_rate_limit="1/2s")
    relay_only = make_services(
        upstream.url,
        kie_api_key=None,
        ideogram_base_url=upstream.url,
        ideogram_api_key=RELAY_API_KEY,
        ideogram_request_deadline_s=8.0,
        kie_rate_limit="1/2s",
    )
    Dispatcher(kie).heartbeat()  # a kie worker is live
    first, second = enqueue_lined(kie, "a", n=2)
    (picked,) = pick_now(kie)
    assert picked.job_id == first

    # The submit queue is shared: a relay-only worker takes the message.
    assert submit_step(relay_only, first, picked.token) == "provider_elsewhere"

    usage = kie.limiter.usage()
    assert (usage.used_in_window, usage.granted_unused) == (0, 0), usage
    assert seconds_until_picked(kie, second, 1.0) <= 1.0, "nothing was sent, yet no moment"


# ------------------------------------------------------------------ 10. resume after a 429


@pytest.mark.policy
def test_attack_resume_after_a_429_hold_leaves_the_dispatchers_waiting(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = make_services(upstream.url)
    dispatcher = Dispatcher(svc)  # one worker's dispatcher, long-lived as in the worker
    svc.limiter.block(120)  # an upstream 429 said Retry-After: 120
    (job_id,) = enqueue_lined(svc, "a")
    dispatcher.tick()  # the budget says: nothing before the hold ends
    assert svc.store.get_internal(job_id, "_line") is not None

    assert resume_key(svc.store, svc.pause, svc.limiter, svc.api_key_id, 600.0)  # remixq resume
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and svc.store.get_internal(job_id, "_line") is not None:
        dispatcher.tick()
        time.sleep(dispatcher.seconds_to_next_round(0.05))

    assert svc.store.get_internal(job_id, "_line") is None, "still in line 5 s after the resume"


# ------------------------------------------------------------------ 11. key rotation


@pytest.mark.policy
def test_attack_during_a_key_rotation_a_picked_job_bounces_between_the_keys(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    old = make_services(upstream.url)
    new = make_services(upstream.url, kie_api_key=f"sk-new-{uuid.uuid4().hex}")
    assert old.api_key_id != new.api_key_id
    (job_id,) = enqueue_lined(old, "a")
    (picked,) = pick_now(old)  # the old key's worker picked it, with its key's moment

    step = submit_step(new, job_id, picked.token)  # a worker already rolled takes it

    assert step != "budget", "thrown back to its line: the new key's budget was free"
    assert old.limiter.usage().granted_unused == 0, "the old key's moment stays taken"


# ------------------------------------------------------------------ 12. a 429 voids


@pytest.mark.policy
def test_attack_a_moment_granted_before_a_429_hold_is_used_after_it(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = make_services(upstream.url)
    (granted,) = svc.limiter.grant(1, 1).members
    svc.limiter.block(0.3)  # an upstream 429 with Retry-After
    while svc.limiter.blocked_until() > svc.limiter.now():
        time.sleep(0.05)

    assert not svc.limiter.consume(granted), "a moment granted before the 429 was used"


# ------------------------------------------------------------------ 1. no worker


def test_attack_a_relay_job_on_a_kie_only_fleet_fails_provider_not_configured(
    sandbox: ManagedProcess, start_workers: StartWorkers
) -> None:
    start_workers(1)  # kie settings only
    job_id = enqueue_relay_job(services(), unique_prompt("relay-on-kie-fleet"))
    try:
        record = wait_for_job(job_id, timeout=30)
    except TimeoutError:
        services().store.cancel(job_id)  # not left waiting for the next module's workers
        raise
    assert record.state is JobState.FAILED and record.fail_code == "provider_not_configured"
    assert record.provider == RELAY


# ------------------------------------------------------------------ 7, 8. over HTTP

TENANT_A, TENANT_B = f"svc-a-{RUN}", f"svc-b-{RUN}"
TOKENS = {name: f"tok-{name}-SECRET-{uuid.uuid4().hex}" for name in (TENANT_A, TENANT_B)}
IMAGE = render_png("attack", 0, "attack", "square")


@pytest.fixture(scope="module")
def api(redis_client: redis.Redis, log_dir: Path) -> Iterator[ManagedProcess]:
    env: dict[str, str | None] = {
        "REDIS_URL": TEST_REDIS_URL,
        "RESULT_BACKEND_URL": TEST_REDIS_URL,
        "REMIX_API_TOKENS": ",".join(f"{name}:{token}" for name, token in TOKENS.items()),
        "REMIX_TENANT_MAX_WAITING": None,
        "KIE_CALLBACK_URL": "",
        "KIE_RATE_LIMIT": "20/10s",
    }
    process = start_api(env, log_path=log_dir / "attack-scheduler.log")
    yield process
    process.stop()


@pytest.fixture
def clients(api: ManagedProcess) -> Iterator[dict[str, httpx.Client]]:
    made = {
        name: httpx.Client(
            base_url=str(api.url), timeout=30, headers={"Authorization": f"Bearer {token}"}
        )
        for name, token in TOKENS.items()
    }
    yield made
    for http in made.values():
        page = http.get("/v1/jobs", params={"state": "queued", "limit": 1000}).json()
        for record in page["jobs"]:
            http.post(f"/v1/jobs/{record['job_id']}/cancel")
        http.close()


def job_body(**fields: Any) -> dict[str, Any]:
    return {"prompt": unique_prompt("attack"), **REMIX_INPUT, **fields}


@pytest.mark.integration
def test_attack_metrics_show_every_tenants_line_to_any_tenant(
    clients: dict[str, httpx.Client],
) -> None:
    answer = clients[TENANT_A].post("/v1/jobs", json=job_body(priority="bulk"))
    assert answer.status_code == 202, answer.text

    text = clients[TENANT_B].get("/metrics").text

    assert f'tenant="{TENANT_A}"' not in text, "tenant B reads tenant A's name and line"


@pytest.mark.integration
@pytest.mark.parametrize("field", ["tenant", "priority"])
def test_attack_an_upload_takes_a_null_field_that_json_refuses(
    clients: dict[str, httpx.Client], field: str
) -> None:
    json_answer = clients[TENANT_A].post("/v1/jobs", json=job_body(**{field: None}))
    request = {
        "prompt": unique_prompt("attack-upload"),
        "reference_image_urls": ["https://example.test/r.png"],
        field: None,
    }
    upload = clients[TENANT_A].post(
        "/v1/jobs:upload",
        data={"request": json.dumps(request)},
        files=[("image_file", ("me.png", IMAGE, "image/png"))],
    )

    assert json_answer.status_code == 422
    assert upload.status_code == 422, f"upload took {field}: null ({upload.status_code})"


@pytest.mark.integration
def test_attack_a_reused_job_id_shows_another_tenants_job_in_a_listing(
    clients: dict[str, httpx.Client], redis_client: redis.Redis
) -> None:
    store = services().store
    job_id = f"order-{uuid.uuid4().hex[:8]}"  # a producer's own id, as remix.submit may carry
    store.create(job_id, job_body(), due_in=3600, tenant=TENANT_A)
    assert store.finish(job_id, JobState.SUCCEEDED, result_urls=["https://a.example/1.png"])
    redis_client.expire(keys.job(job_id), 1)  # its time to live runs out
    deadline = time.monotonic() + 5
    while redis_client.exists(keys.job(job_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    # What the worker does for a first remix.submit message of tenant B with that job_id.
    store.create(job_id, job_body(), due_in=3600, tenant=TENANT_B)
    assert store.finish(job_id, JobState.SUCCEEDED, result_urls=["https://b.example/1.png"])

    page = clients[TENANT_A].get("/v1/jobs", params={"state": "succeeded", "limit": 1000})

    leaked = [r for r in page.json()["jobs"] if r["tenant"] != TENANT_A]
    assert not leaked, f"tenant A lists {leaked}"
