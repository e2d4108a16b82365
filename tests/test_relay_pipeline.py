"""The legacy remix relay end to end: real workers started without ``KIE_API_KEY``, the
sandbox over HTTP in both of the relay's answer modes, and no secret anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
import requests

from producers import enqueue_remix, wait_for_job
from sandbox.control import SandboxControl
from sandbox.launch import LaunchError, ManagedProcess
from tests.conftest import REMIX_INPUT, StartWorkers, unique_prompt
from tests.helpers import redis_value, waiting_jobs
from tests.relay_kit import RELAY, RELAY_API_KEY, enqueue_relay_job
from worker import keys
from worker.app import services
from worker.models import JobState
from worker.settings import load_settings
from worker.store.jobs import decode_text
from worker.upstreams.providers import ideogram_key_id

pytestmark = pytest.mark.integration
JOB_TIMEOUT_S = 60


def relay_worker_env(sandbox: ManagedProcess) -> dict[str, str | None]:
    return {
        "KIE_API_KEY": None,  # unset (set, it must hold a key)
        "IDEOGRAM_BASE_URL": sandbox.url,
        "IDEOGRAM_API_KEY": RELAY_API_KEY,
        "IDEOGRAM_RATE_LIMIT": "1000/1s",
        "IDEOGRAM_READ_TIMEOUT_S": "10",
        "IDEOGRAM_REQUEST_DEADLINE_S": "15",
    }


@pytest.fixture
def relay(control: SandboxControl) -> Iterator[SandboxControl]:
    control.reset()
    control.configure(relay_api_key=RELAY_API_KEY, relay_mode="sync", fault_endpoints=[])
    yield control
    control.configure(relay_api_key=None, relay_mode="sync")


def _fragments(secret: str) -> list[bytes]:
    return [secret[i : i + 10].encode() for i in range(0, len(secret) - 9, 5)]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_relay_jobs_succeed_on_a_worker_without_a_kie_key(
    relay: SandboxControl,
    redis_client: redis.Redis,
    sandbox: ManagedProcess,
    start_workers: StartWorkers,
    mode: str,
) -> None:
    relay.configure(relay_mode=mode)
    prompts = [unique_prompt(f"relay-{mode}-{i} ✓") for i in range(3)]
    job_ids = [enqueue_relay_job(services(), p, num_images=2) for p in prompts]

    queued = [job for job in waiting_jobs(redis_client) if job["job_id"] in job_ids]
    assert len(queued) == 3 and all(job["provider"] == RELAY for job in queued)
    assert all(len(json.dumps(job["request"])) < 1000 for job in queued)  # a reference

    (worker,) = start_workers(1, **relay_worker_env(sandbox))
    records = [wait_for_job(j, timeout=JOB_TIMEOUT_S) for j in job_ids]

    failed = [(r.fail_code, r.fail_msg) for r in records if r.state is not JobState.SUCCEEDED]
    assert not failed
    assert all(r.provider == RELAY and len(r.result_urls) == 2 for r in records)
    assert all(r.upstream_task_id.startswith("sync-") == (mode == "sync") for r in records)  # type: ignore[union-attr]
    image = requests.get(records[0].result_urls[0], timeout=5)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    stats = relay.stats()
    assert stats["relay_accepted"] == 3 and stats["create_requests"] == 0
    assert (stats["relay_status_requests"] > 0) == (mode == "async")
    secret_parts = _fragments(RELAY_API_KEY)
    for key in redis_client.scan_iter("*"):
        value = redis_value(redis_client, key)
        assert not any(part in value or part in key for part in secret_parts), key
    assert worker.log_path is not None
    log = worker.log_path.read_bytes()
    assert b"remix.submit" in log and not any(part in log for part in secret_parts)
    relay_key = ideogram_key_id(load_settings(ideogram_api_key=RELAY_API_KEY))
    assert decode_text(redis_client.hget(keys.KNOWN_API_KEYS, relay_key)) == "1000/1s"


def test_a_kie_job_on_a_relay_only_fleet_fails_provider_not_configured(
    relay: SandboxControl, sandbox: ManagedProcess, start_workers: StartWorkers
) -> None:
    start_workers(1, **relay_worker_env(sandbox))
    job_id = enqueue_remix(prompt=unique_prompt("kie-on-relay-fleet"), **REMIX_INPUT)  # type: ignore[arg-type]
    record = wait_for_job(job_id, timeout=JOB_TIMEOUT_S)
    assert record.state is JobState.FAILED and record.fail_code == "provider_not_configured"
    assert "KIE_API_KEY" in (record.fail_msg or "")
    assert relay.stats()["create_requests"] == 0


def test_a_worker_with_no_upstream_at_all_refuses_to_start(
    sandbox: ManagedProcess, start_workers: StartWorkers
) -> None:
    with pytest.raises(LaunchError, match="refusing to start"):
        start_workers(1, KIE_API_KEY=None, IDEOGRAM_BASE_URL="", IDEOGRAM_API_KEY=None)
