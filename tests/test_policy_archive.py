"""Result archiving without a worker: real Redis, the sandbox over HTTP, a real archive.

Each test finishes a job the way the pipeline does (submit and poll steps against the
sandbox, or ``update.lua`` directly), claims its archiving as the dispatcher would
(``claim_archive.lua``) and runs one archive step at a time, then looks at the record,
the archive (a temporary directory, or moto's S3 server) and the schedules.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from sandbox.server import SandboxServer
from tests.helpers import redis_value, wait_until
from tests.moto_kit import AWS_TEST_ENV, S3Server, moto_s3
from tests.policy_kit import INPUT, make_services, submit_now, token_of
from tests.webhook_receiver import WebhookReceiver, receiver
from worker import keys
from worker.fleet.dispatcher import Dispatcher
from worker.models import JobRecord, JobState
from worker.policies.archive import archive_step
from worker.policies.notify import notify_step
from worker.policies.poll import poll_step
from worker.services import Services
from worker.store.archive import ArchiveDispatch, archive_schedule
from worker.store.notify import notify_store

pytestmark = pytest.mark.policy
__all__ = ["moto_s3"]  # the fixture, used by name

ARCHIVE: dict[str, Any] = {
    "remix_archive_timeout_s": 3.0,
    "remix_archive_retry_base_s": 0.05,
    "remix_archive_retry_max_s": 0.2,
    "remix_archive_max_attempts": 3,
    # The sandbox's result URLs are on 127.0.0.1.
    "remix_archive_allow_private": True,
    "remix_notify_allow_private": True,
}


@pytest.fixture
def archive_dir(tmp_path: Path) -> Path:
    return tmp_path / "archive"


@pytest.fixture
def svc(policy_redis: redis.Redis, upstream: SandboxServer, archive_dir: Path) -> Services:
    return make_services(upstream.url, remix_archive_url=archive_dir.as_uri(), **ARCHIVE)


@pytest.fixture
def hooks() -> Iterator[WebhookReceiver]:
    with receiver() as server:
        yield server


def succeeded_job(
    svc: Services, num_images: int = 1, job_id: str | None = None, **create: Any
) -> str:
    """A job run through the sandbox until it succeeded (submit, then polls)."""
    job_id = job_id or uuid.uuid4().hex
    request = {"prompt": f"archive {job_id[:8]}", **INPUT, "num_images": str(num_images)}
    svc.store.create(job_id, request, due_in=0.0, **create)
    assert submit_now(svc, job_id) == "accepted"

    def finished() -> bool:
        poll_step(svc, job_id, token_of(svc, job_id))
        return record(svc, job_id).finished

    wait_until(finished, 10, interval=0.2)
    assert record(svc, job_id).state is JobState.SUCCEEDED
    return job_id


def finished_job(svc: Services, state: JobState, result_urls: list[str], **create: Any) -> str:
    """A job finished with the given results, as the pipeline finishes one."""
    job_id = uuid.uuid4().hex
    svc.store.create(job_id, {"prompt": f"archive {job_id[:8]}", **INPUT}, due_in=60, **create)
    fields: dict[str, Any] = {"result_urls": result_urls} if result_urls else {}
    if state is JobState.FAILED:
        fields.update(fail_code="501", fail_msg="generation failed")
    assert svc.store.finish(job_id, state, **fields)
    return job_id


def record(svc: Services, job_id: str) -> JobRecord:
    found = svc.store.get(job_id)
    assert found is not None
    return found


def claim(svc: Services, oldest: float | None = None) -> list[ArchiveDispatch]:
    return archive_schedule(svc).claim(10, svc.settings, oldest_waiting=oldest)


def step(svc: Services, job_id: str) -> str:
    """Claim the job's archiving (waiting for it to be due) and run one step."""
    found: list[ArchiveDispatch] = []

    def handed_out() -> bool:
        found.extend(d for d in claim(svc) if d.job_id == job_id)
        return bool(found)

    wait_until(handed_out, 5, interval=0.02)
    return archive_step(svc, job_id, found[0].token)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_succeeded_job_is_archived_to_the_directory(svc: Services, archive_dir: Path) -> None:
    job_id = succeeded_job(svc, num_images=2)
    before = record(svc, job_id)
    assert before.archive is not None and before.archive.state == "pending"

    assert step(svc, job_id) == "done"

    after = record(svc, job_id)
    assert after.archive is not None and after.archive.state == "done"
    assert after.archive.attempts == 1 and after.archive.archived_at is not None
    assert [a.location for a in after.archived] == [
        (archive_dir / job_id / f"{n}.png").as_uri() for n in range(2)
    ]
    for url, entry in zip(before.result_urls, after.archived, strict=True):
        direct = requests.get(url, timeout=5).content  # the sandbox's image itself
        stored = (archive_dir / job_id / Path(entry.location).name).read_bytes()
        assert sha256_of(stored) == sha256_of(direct) == entry.sha256
        assert entry.bytes == len(direct) and entry.content_type == "image/png"
        assert entry.source_url == url
    # A copy, never a change: state, results and finish time stay as they were.
    assert after.model_dump(exclude={"archive", "archived"}) == before.model_dump(
        exclude={"archive", "archived"}
    )
    assert archive_schedule(svc).due(job_id) is None


def test_a_failing_download_is_retried_then_reported_and_the_job_stays_succeeded(
    svc: Services, upstream: SandboxServer, archive_dir: Path
) -> None:
    missing = f"{upstream.url}/files/no-such-task/0.png"  # the sandbox answers 404
    job_id = finished_job(svc, JobState.SUCCEEDED, [missing])

    assert step(svc, job_id) == "retry"
    pending = record(svc, job_id).archive
    assert pending is not None and pending.state == "pending" and pending.attempts == 1
    assert pending.last_error == "image 0: HTTP 404"
    assert archive_schedule(svc).due(job_id) is not None

    assert step(svc, job_id) == "retry"
    assert step(svc, job_id) == "failed"

    final = record(svc, job_id)
    assert final.archive is not None
    assert (final.archive.state, final.archive.attempts) == ("failed", 3)
    assert final.archive.last_error == "image 0: HTTP 404"
    assert final.state is JobState.SUCCEEDED and final.result_urls == [missing]
    assert final.archived == [] and not archive_dir.exists()
    assert archive_schedule(svc).due(job_id) is None


def test_a_loopback_result_url_is_refused_unless_allowed(
    policy_redis: redis.Redis, upstream: SandboxServer, archive_dir: Path
) -> None:
    """Without REMIX_ARCHIVE_ALLOW_PRIVATE, the sandbox's 127.0.0.1 result URLs are not
    fetched: the try fails at once (no later try could differ) and nothing is stored."""
    svc = make_services(
        upstream.url,
        remix_archive_url=archive_dir.as_uri(),
        **{**ARCHIVE, "remix_archive_allow_private": False},
    )
    job_id = succeeded_job(svc)

    assert step(svc, job_id) == "failed"

    final = record(svc, job_id)
    assert final.archive is not None
    assert (final.archive.state, final.archive.attempts) == ("failed", 1)
    assert final.archive.last_error == "image 0: refused: not a public address"
    assert final.archived == [] and not archive_dir.exists()
    assert archive_schedule(svc).due(job_id) is None


def test_the_webhook_waits_for_archiving_and_carries_its_outcome(
    svc: Services, hooks: WebhookReceiver
) -> None:
    job_id = succeeded_job(svc, notify_url=hooks.url("/done"))
    pending = record(svc, job_id).notification
    assert pending is not None and pending.state == "pending"
    assert notify_store(svc).due(job_id) is None  # not before archiving ended

    assert step(svc, job_id) == "done"
    assert notify_store(svc).due(job_id) is not None
    [item] = notify_store(svc).claim(10, svc.settings)
    assert notify_step(svc, item.job_id, item.token, item.receiver) == "delivered"

    [delivery] = hooks.deliveries("/done")
    body = json.loads(delivery.body)
    assert body["archive"]["state"] == "done"
    assert body["archived"][0]["location"].endswith(f"/{job_id}/0.png")


def test_the_webhook_goes_after_archiving_was_given_up(
    svc: Services, upstream: SandboxServer, hooks: WebhookReceiver
) -> None:
    job_id = finished_job(
        svc,
        JobState.SUCCEEDED,
        [f"{upstream.url}/files/gone/0.png"],
        notify_url=hooks.url("/done"),
    )
    for _ in range(2):
        assert step(svc, job_id) == "retry"
        assert notify_store(svc).due(job_id) is None
    assert step(svc, job_id) == "failed"
    assert notify_store(svc).due(job_id) is not None


def test_a_failed_job_is_not_archived_and_its_webhook_goes_at_once(
    svc: Services, hooks: WebhookReceiver
) -> None:
    job_id = finished_job(svc, JobState.FAILED, [], notify_url=hooks.url("/done"))
    assert record(svc, job_id).archive is None
    assert archive_schedule(svc).due(job_id) is None
    assert notify_store(svc).due(job_id) is not None


def test_without_archiving_nothing_changes(
    policy_redis: redis.Redis, upstream: SandboxServer, hooks: WebhookReceiver
) -> None:
    plain = make_services(upstream.url, **ARCHIVE)
    job_id = finished_job(plain, JobState.SUCCEEDED, ["https://example.test/out.png"])
    assert record(plain, job_id).archive is None
    assert archive_schedule(plain).size() == 0
    hooked = finished_job(
        plain, JobState.SUCCEEDED, ["https://example.test/out.png"], notify_url=hooks.url()
    )
    assert notify_store(plain).due(hooked) is not None


def test_only_the_latest_message_archives(svc: Services, archive_dir: Path) -> None:
    job_id = succeeded_job(svc)
    [first] = claim(svc)
    # Its lease ran out (the message was lost): the schedule hands it out again.
    svc.store.redis.zadd(keys.ARCHIVE_SCHEDULE, {job_id: 0})
    [second] = claim(svc)
    assert second.resent and second.token == first.token + 1

    assert archive_step(svc, job_id, first.token) == "stale"
    assert not archive_dir.exists()
    assert archive_step(svc, job_id, second.token) == "done"
    assert archive_step(svc, job_id, second.token) == "dropped"  # already done
    assert record(svc, job_id).archive.state == "done"  # type: ignore[union-attr]


def test_an_entry_whose_message_still_waits_is_not_sent_again(svc: Services) -> None:
    job_id = succeeded_job(svc)
    [first] = claim(svc)
    svc.store.redis.zadd(keys.ARCHIVE_SCHEDULE, {job_id: 0})
    # The archive queue's oldest waiting message is older than this entry's: it may be it.
    assert claim(svc, oldest=time.time() - 1) == []
    assert archive_schedule(svc).due(job_id) > time.time()  # type: ignore[operator]
    # The queue is empty: the message was lost after all, and the entry goes again.
    svc.store.redis.zadd(keys.ARCHIVE_SCHEDULE, {job_id: 0})
    assert claim(svc, oldest=None)[0].token == first.token + 1


def test_the_dispatcher_publishes_on_the_archive_queue(
    svc: Services, policy_redis: redis.Redis
) -> None:
    job_id = succeeded_job(svc)
    policy_redis.delete("archive")
    Dispatcher(svc).tick()
    [raw] = policy_redis.lrange("archive", 0, -1)
    message = json.loads(raw)
    assert message["headers"]["task"] == "remix.archive"
    assert job_id in message["headers"]["kwargsrepr"]
    assert policy_redis.llen("notify") == 0


def test_a_succeeded_job_is_archived_to_s3(
    policy_redis: redis.Redis, upstream: SandboxServer, moto_s3: S3Server
) -> None:
    svc = make_services(
        upstream.url,
        remix_archive_url=f"s3://{moto_s3.bucket}/remixq/results",
        remix_archive_s3_endpoint_url=moto_s3.endpoint_url,
        **ARCHIVE,
    )
    job_id = succeeded_job(svc)
    assert step(svc, job_id) == "done"

    [entry] = record(svc, job_id).archived
    key = f"remixq/results/{job_id}/0.png"
    assert entry.location == f"s3://{moto_s3.bucket}/{key}"
    stored = moto_s3.client().get_object(Bucket=moto_s3.bucket, Key=key)
    data = stored["Body"].read()
    direct = requests.get(record(svc, job_id).result_urls[0], timeout=5).content
    assert sha256_of(data) == sha256_of(direct) == entry.sha256
    assert stored["ContentType"] == "image/png"
    secret = AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"].encode()
    assert secret not in redis_value(policy_redis, keys.job(job_id).encode())


def test_a_refused_s3_write_is_retried_and_reported(
    policy_redis: redis.Redis, upstream: SandboxServer, moto_s3: S3Server
) -> None:
    svc = make_services(
        upstream.url,
        remix_archive_url="s3://no-such-bucket-remixq/x",
        remix_archive_s3_endpoint_url=moto_s3.endpoint_url,
        **ARCHIVE,
    )
    job_id = succeeded_job(svc)
    assert step(svc, job_id) == "retry"
    archive = record(svc, job_id).archive
    assert archive is not None and archive.last_error is not None
    assert archive.last_error.startswith("image 0: S3 refused the write of s3://no-such-bucket")
    assert "NoSuchBucket" in archive.last_error


def test_the_lease_grows_with_the_number_of_images(svc: Services) -> None:
    one, three = succeeded_job(svc, num_images=1), succeeded_job(svc, num_images=3)
    started = time.time()
    claimed = {d.job_id for d in claim(svc)}
    assert claimed == {one, three}
    per_image = svc.settings.remix_archive_timeout_s + 60
    lease = {job_id: archive_schedule(svc).due(job_id) - started for job_id in claimed}  # type: ignore[operator]
    assert lease[one] == pytest.approx(per_image + 30, abs=2)
    assert lease[three] == pytest.approx(3 * per_image + 30, abs=2)


def test_a_worker_without_the_setting_counts_a_try_and_leaves_it_to_others(
    svc: Services, upstream: SandboxServer, archive_dir: Path
) -> None:
    job_id = succeeded_job(svc)
    unset = make_services(upstream.url, **ARCHIVE)
    [item] = claim(svc)
    assert archive_step(unset, job_id, item.token) == "retry"
    archive = record(svc, job_id).archive
    assert archive is not None and archive.state == "pending" and archive.attempts == 1
    assert archive.last_error is not None and "REMIX_ARCHIVE_URL unset" in archive.last_error
    assert step(svc, job_id) == "done"
