"""The job store on a Redis group that fails over (a primary, one replica, three
sentinels: real ``redis-server`` processes), and the acknowledged acceptance
(``REMIX_ACCEPT_WAIT_MS``). No worker; the fleet under a failover is tests/test_failover.py.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from sandbox.redis_group import RedisGroup
from sandbox.server import SandboxServer
from tests.helpers import wait_until
from tests.policy_kit import INPUT, make_services, new_job, submit_now
from worker.models import JobState
from worker.redis_urls import SentinelOptions
from worker.services import Services
from worker.store.connection import redis_client
from worker.store.jobs import JobStore

pytestmark = pytest.mark.integration
PASSWORD = f"primary-{uuid.uuid4().hex}"
SENTINEL_PASSWORD = f"sentinel-{uuid.uuid4().hex}"
OPTIONS = SentinelOptions("mymaster", SENTINEL_PASSWORD)
WAIT_MS = 300


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisGroup]:
    started = RedisGroup(
        tmp_path_factory.mktemp("group"), password=PASSWORD, sentinel_password=SENTINEL_PASSWORD
    ).start()
    yield started
    started.close()


def job_store(group: RedisGroup) -> JobStore:
    return JobStore(redis_client(group.url(), retry_s=30, sentinel=OPTIONS), ttl_s=3600)


def created(store: JobStore) -> str:
    job_id = uuid.uuid4().hex
    store.create(job_id, {"prompt": f"group {job_id}", **INPUT}, due_in=0.0)
    return job_id


def test_an_acceptance_returns_once_the_replica_has_it(group: RedisGroup) -> None:
    store = job_store(group)
    job_id = created(store)

    outcome, replicas = store.accept_replicated(job_id, "", "task-acked", 5.0, WAIT_MS)

    assert (outcome, replicas) == ("accepted", 1)
    [replica] = [port for port in group.servers if port != group.primary_port()]
    with group.client(replica) as client:
        assert client.hget(f"remixq:job:{job_id}", "upstream_task_id") == b'"task-acked"'


def test_a_submit_step_counts_an_acceptance_no_replica_acknowledged(
    policy_redis: object, upstream: SandboxServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The policy database has no replica: WAIT returns 0 after its timeout; the job is
    accepted all the same, counted and logged."""
    svc: Services = make_services(upstream.url, remix_accept_wait_ms=WAIT_MS)
    job_id, _ = new_job(svc)

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="worker.policies.submit"):
        assert submit_now(svc, job_id) == "accepted"

    assert time.monotonic() - started >= WAIT_MS / 1000
    record = svc.store.get(job_id)
    assert record is not None and record.state is JobState.SUBMITTED
    assert svc.broker.hget("remixq:metrics", "accepts_unreplicated_total") == b"1"
    assert "no Redis replica acknowledged" in caplog.text


def test_without_the_setting_an_acceptance_does_not_wait(
    policy_redis: object, upstream: SandboxServer
) -> None:
    svc: Services = make_services(upstream.url)
    job_id, _ = new_job(svc)

    started = time.monotonic()
    assert submit_now(svc, job_id) == "accepted"

    assert time.monotonic() - started < WAIT_MS / 1000
    assert svc.broker.hget("remixq:metrics", "accepts_unreplicated_total") is None


def test_one_client_follows_the_primary_through_a_failover(group: RedisGroup) -> None:
    """Last in the module: it fails the group over, then starts the old primary again on
    its address, empty and as a primary (until the sentinels convert it).

    The same clients (a worker's) go on across the promotion: a write is retried on the
    promoted replica and finds what was written before; a BLPOP that was waiting when the
    primary died is retried there too, never on the old address although a server answers
    there again (redis-py alone reconnects a retried command to the address it had:
    redis/redis-py#3874).
    """
    store = job_store(group)
    before = created(store)
    waiting = redis_client(group.url(), retry_s=30, sentinel=OPTIONS)
    answers: list[object] = []
    waiter = threading.Thread(target=lambda: answers.append(waiting.blpop(["handoff"], 8)))
    waiter.start()
    old = group.primary_port()
    with group.client(old) as primary:
        wait_until(lambda: int(primary.info("clients")["blocked_clients"]) == 1, 10)

    group.kill(old)
    after = created(store)  # retried until the sentinels name the promoted replica
    new = group.wait_for_new_primary(old, 30)
    group.restart(old)
    with group.client(old) as restarted:
        wait_until(lambda: restarted.ping(), 10)
    store.redis.rpush("handoff", "after")
    waiter.join(20)

    assert answers == [(b"handoff", b"after")]
    assert group.primary_port() == new
    assert [r is not None for r in store.get_many([before, after])] == [True, True]
