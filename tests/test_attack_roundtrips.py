"""Faults injected into the changes that cut Redis round trips per job (a poll batch begun
in one round trip, a step's writes batched, finishes read in the same round trip): what
each must still guarantee. See docs/design.md (the schedule and its leases)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import worker.settings as settings_module
from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from tests.policy_kit import API_KEY, make_services, new_job, submit_now
from worker.services import Services
from worker.tasks import _poll_batch

#: What the recordInfo of the slow upstream below takes (under the request deadline).
SLOW_POLL_S = 1.5


@pytest.fixture
def slow_polls(policy_redis: redis.Redis) -> Iterator[SandboxServer]:
    """An upstream whose every recordInfo answers after :data:`SLOW_POLL_S`."""
    server = SandboxServer(
        SandboxConfig(
            api_key=API_KEY,
            generation_seconds=30.0,
            slow_rate=1.0,
            slow_seconds=SLOW_POLL_S,
            fault_endpoints=["recordInfo"],
        )
    ).start()
    yield server
    server.stop()


def _due_polls(svc: Services, n: int) -> list[list[Any]]:
    """A poll batch of ``n`` accepted jobs, claimed as the dispatcher claims them."""
    ids = [new_job(svc)[0] for _ in range(n)]
    for job_id in ids:
        assert submit_now(svc, job_id) == "accepted"
    time.sleep(svc.settings.remix_poll_initial_s + 0.2)
    due = {d.job_id: d for d in svc.store.claim_due(50, svc.settings.lease_s)}
    assert set(ids) <= set(due)
    return [[job_id, due[job_id].token, due[job_id].due] for job_id in ids]


def test_a_job_of_a_poll_batch_is_not_sent_again_while_its_poll_runs(
    slow_polls: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A short lease margin keeps the test short: a lease is the request deadline plus it.
    monkeypatch.setattr(settings_module, "LEASE_MARGIN_S", 0.5)
    svc = make_services(slow_polls.url, kie_request_deadline_s=2.0, kie_read_timeout_s=2.0)
    batch = _due_polls(svc, 2)
    lease_s = svc.settings.lease_s
    assert (
        SLOW_POLL_S
        < svc.settings.kie_request_deadline_s
        < lease_s
        < lease_s + 0.3
        < 2 * SLOW_POLL_S
    )

    steps: dict[str, str] = {}
    started = time.monotonic()
    polling = threading.Thread(target=lambda: steps.update(_poll_batch(svc, batch)))
    polling.start()
    # The first poll takes SLOW_POLL_S; the second starts then and is still running
    # when a lease counted from the start of the batch has run out.
    time.sleep(max(0.0, started + lease_s + 0.3 - time.monotonic()))
    assert polling.is_alive()
    claimed = {d.job_id for d in svc.store.claim_due(50, lease_s)}
    polling.join(timeout=10)

    second = batch[1][0]
    assert second not in claimed, "the job's lease ran out while its poll was running"
    assert steps == dict.fromkeys((batch[0][0], second), "pending")


def test_a_malformed_entry_of_a_poll_batch_costs_its_other_jobs_nothing(svc: Services) -> None:
    batch = _due_polls(svc, 3)
    good = [entry[0] for entry in batch]
    # A bad due time in the middle, entries that are no triple at the end.
    batch[1] = [batch[1][0], batch[1][1], "soon"]
    malformed: list[Any] = [*batch, ["only-an-id"], None, "text"]

    steps = _poll_batch(svc, malformed)

    assert all(steps.get(job_id) in ("pending", "succeeded") for job_id in good), steps
    assert all(svc.store.get(job_id).polls == 1 for job_id in good)  # type: ignore[union-attr]
