"""What the fast policy tests share: real Redis, the sandbox over real HTTP, no worker.

The policies take their collaborators as an argument (:class:`worker.runtime.Services`), so a
test builds them against a Redis database of its own (no worker consumes it) and a sandbox
served from a thread of the test process on 127.0.0.1, then runs one step at a time and
looks at the record, the schedule and the sandbox's counters.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from tests import redis_kit
from tests.helpers import empty_database
from worker.fields import BlobRef
from worker.fleet.picker import Picker
from worker.policies.poll import poll_step
from worker.policies.submit import submit_step
from worker.services import Services, build_services
from worker.settings import Settings
from worker.store.blobs import new_ref
from worker.store.jobs import Dispatch
from worker.store.lines import backstop_s

API_KEY = f"sk-policy-{uuid.uuid4().hex}"
INPUT = {
    "image_url": "https://example.test/base.png",
    "reference_image_urls": ["https://example.test/ref.png"],
}
FAST = {
    "remix_poll_initial_s": 0.2,
    "remix_poll_max_s": 1.0,
    "remix_retry_base_s": 0.05,
    "remix_retry_max_s": 0.5,
    "remix_deadline_s": 60.0,
    "remix_pause_probe_s": 0.5,
    "kie_request_deadline_s": 3.0,
    "kie_read_timeout_s": 2.0,
    "kie_rate_limit": "1000/1s",
}


def __getattr__(name: str) -> str:
    """``POLICY_REDIS_URL``, the policy tests' database: read when asked, because the test
    Redis starts (:mod:`tests.redis_kit`) after this module is imported."""
    if name == "POLICY_REDIS_URL":
        return redis_kit.url(redis_kit.POLICY)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@pytest.fixture
def policy_redis() -> Iterator[redis.Redis]:
    with empty_database(redis_kit.url(redis_kit.POLICY), "the policy tests") as client:
        yield client


@pytest.fixture
def upstream() -> Iterator[SandboxServer]:
    server = SandboxServer(SandboxConfig(api_key=API_KEY, generation_seconds=0.5)).start()
    yield server
    server.stop()


def make_services(
    upstream_url: str, redis_retry_s: float | None = None, **overrides: Any
) -> Services:
    """Services against the policy database and ``upstream_url``, with fast settings."""
    url = redis_kit.url(redis_kit.POLICY)
    fields = {
        "redis_url": url,
        "result_backend_url": url,
        "kie_base_url": upstream_url,
        "kie_upload_base_url": upstream_url,
        "kie_api_key": API_KEY,
        **FAST,
        **overrides,
    }
    settings = Settings(**fields)
    app = Celery("policy-tests", set_as_current=False)
    app.conf.update(broker_url=settings.redis_url, result_backend=settings.backend_url)
    return build_services(settings, app, redis_retry_s)


@pytest.fixture
def svc(policy_redis: redis.Redis, upstream: SandboxServer) -> Services:
    return make_services(upstream.url)


def new_job(svc: Services, prompt: str | None = None, **fields: Any) -> tuple[str, str]:
    """Create a queued job, waiting in its line; returns ``(job_id, prompt)``."""
    prompt = prompt or f"policy {uuid.uuid4().hex[:10]}"
    job_id = uuid.uuid4().hex
    svc.store.create(job_id, {"prompt": prompt, **INPUT, **fields}, due_in=backstop_s(svc.settings))
    return job_id, prompt


def stored_ref(svc: Services, data: bytes, name: str = "base.png") -> BlobRef:
    """A PNG stored in the services' blob store, as a producer stores an image file."""
    ref = new_ref(data, "image/png", name)
    svc.blobs.store([(ref, data)])
    return ref


def token_of(svc: Services, job_id: str) -> int:
    """The job's current dispatch token (what the latest message carries)."""
    return int(svc.store.get_internal(job_id, "_dispatch") or 0)


def accepted(upstream: SandboxServer, prompt: str) -> int:
    return int(upstream.stats()["accepted_by_prompt"].get(prompt, 0))


def sent(upstream: SandboxServer, prompt: str) -> int:
    return int(upstream.stats()["create_requests_by_prompt"].get(prompt, 0))


def pick_now(svc: Services, provider: str | None = None) -> list[Dispatch]:
    """What a dispatcher round does for the lines: send moments of the key's budget go to
    the next jobs waiting in ``provider``'s lines, which are handed out (not published)."""
    name = provider or svc.provider
    waiting = svc.lines.waiting([name])[name]
    return Picker(svc).pick(name, waiting) if waiting else []


def give_moment(svc: Services, provider: str | None = None) -> list[str]:
    """The ids of the jobs :func:`pick_now` picked."""
    return [d.job_id for d in pick_now(svc, provider)]


def submit_now(svc: Services, job_id: str) -> str:
    """The job's next submit step as the fleet would run it: with its latest token, and,
    while it waits in its line, after rounds of the picker gave it a send moment (jobs
    ahead of it in the lines' order are handed out first, and not run)."""
    step = submit_step(svc, job_id, token_of(svc, job_id))
    for _ in range(3):
        if step != "line" or not _picked(svc, job_id):
            return step
        step = submit_step(svc, job_id, token_of(svc, job_id))
    return step


def _picked(svc: Services, job_id: str, rounds: int = 20) -> bool:
    provider = svc.store.get(job_id).provider  # type: ignore[union-attr]
    for _ in range(rounds):
        picked = give_moment(svc, provider)
        if job_id in picked:
            return True
        if not picked:
            return False
    return False


def run_steps(svc: Services, job_id: str, timeout: float = 15.0) -> list[str]:
    """Run the job's steps (submit or poll, by its record) as they come due, until it
    finishes or ``timeout`` passes; returns what each step did."""
    steps: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = svc.store.get(job_id)
        assert record is not None
        if record.finished:
            return steps
        if not record.upstream_task_id and svc.store.get_internal(job_id, "_line"):
            steps.append(submit_now(svc, job_id))  # waits in line: a send moment comes
            continue
        due = svc.store.scheduled(job_id)
        if due is not None and due > svc.clock.now():
            time.sleep(min(0.2, due - svc.clock.now()))
            continue
        step = poll_step if record.upstream_task_id else submit_step
        steps.append(step(svc, job_id, token_of(svc, job_id)))
    return steps


def enqueue_lined(
    svc: Services, tenant: str = "default", priority: str = "normal", n: int = 1
) -> list[str]:
    """Create ``n`` jobs of ``tenant`` and ``priority``, waiting in their line, in order."""
    ids = []
    for _ in range(n):
        job_id = uuid.uuid4().hex
        request = {"prompt": f"lines {job_id[:8]}", **INPUT}
        svc.store.create(
            job_id, request, due_in=backstop_s(svc.settings), tenant=tenant, priority=priority
        )
        ids.append(job_id)
    return ids


def pick_next(svc: Services, n: int) -> list[str]:
    """The ids of the next ``n`` jobs the lines give send moments to (unused ones given back)."""
    grants = svc.limiter.grant(n, n)
    picked = svc.lines.pick(
        svc.provider, grants.members, svc.settings.tenant_weights, svc.settings.lease_s
    )
    svc.limiter.give_back(grants.members[len(picked) :])
    return [d.job_id for d in picked]


def tenant_of(svc: Services, job_id: str) -> str:
    record = svc.store.get(job_id)
    assert record is not None
    return record.tenant


@pytest.fixture
def events(svc: Services) -> Iterator[redis.client.PubSub]:
    """Every message on the Celery events channels (task events, any database)."""
    svc.publisher.app.conf.task_send_sent_event = True
    pubsub = svc.store.redis.pubsub()
    pubsub.psubscribe("*celeryev*")
    pubsub.get_message(timeout=1.0)  # the subscription's confirmation
    yield pubsub
    pubsub.close()


def published(pubsub: redis.client.PubSub, wait_s: float = 0.5) -> list[tuple[str, Any]]:
    """``(channel, decoded body)`` of each message published within ``wait_s``."""
    found = []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
        if message and message["type"] == "pmessage":
            envelope = json.loads(message["data"])
            body = json.loads(base64.b64decode(envelope["body"]))
            found.append((message["channel"].decode(), body))
    return found
