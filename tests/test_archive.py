"""Result archiving end to end: real ``celery -A worker.app worker`` processes (no ``-Q``),
the sandbox over HTTP, and a real archive: a directory, and moto's S3 server.

The job goes the whole way: enqueued by the producer API, sent and polled by a worker,
then its images archived by the ``remix.archive`` task on queue ``archive``, which a
worker started without ``-Q`` consumes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from producers import enqueue_remix, get_job, wait_for_job
from sandbox.launch import ManagedProcess
from tests.conftest import SECRET_API_KEY, TEST_REDIS_URL, StartWorkers, unique_prompt
from tests.helpers import wait_until
from tests.moto_kit import AWS_TEST_ENV, S3Server, moto_s3
from tests.webhook_receiver import receiver
from worker.models import JobRecord, JobState

pytestmark = pytest.mark.integration
__all__ = ["moto_s3"]  # the fixture, used by name

ARCHIVE_SETTINGS = {
    "REMIX_ARCHIVE_ALLOW_PRIVATE": "1",  # the sandbox's result URLs are on 127.0.0.1
    "REMIX_ARCHIVE_TIMEOUT_S": "5",
    "REMIX_ARCHIVE_RETRY_BASE_S": "0.2",
    "REMIX_ARCHIVE_RETRY_MAX_S": "1",
}


@pytest.fixture
def producer_allows_loopback() -> Iterator[None]:
    """This process enqueues like a producer that may name a loopback webhook receiver."""
    from worker.app import configure

    configure(
        redis_url=TEST_REDIS_URL, result_backend_url=TEST_REDIS_URL, remix_notify_allow_private=True
    )
    yield
    configure(redis_url=TEST_REDIS_URL, result_backend_url=TEST_REDIS_URL)


def archived_job(prompt: str, notify_url: str | None = None, state: str = "done") -> JobRecord:
    """Enqueue a job, wait for it to succeed, then for its archiving to end in ``state``."""
    job_id = enqueue_remix(
        prompt,
        "https://example.test/base.png",
        ["https://example.test/ref.png"],
        notify_url=notify_url,
        num_images=2,
    )
    assert wait_for_job(job_id, timeout=60).state is JobState.SUCCEEDED

    def archive_ended() -> JobRecord | None:
        record = get_job(job_id)
        if record is not None and record.archive is not None and record.archive.state != "pending":
            return record
        return None

    record = wait_until(archive_ended, 30, interval=0.2)
    assert record.archive is not None and record.archive.state == state, record.archive
    return record


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_worker_archives_a_job_to_a_directory(
    sandbox: ManagedProcess, start_workers: StartWorkers, tmp_path: Path
) -> None:
    start_workers(REMIX_ARCHIVE_URL=tmp_path.as_uri(), **ARCHIVE_SETTINGS)
    record = archived_job(unique_prompt("archive-dir"))

    assert [a.location for a in record.archived] == [
        (tmp_path / record.job_id / f"{n}.png").as_uri() for n in range(2)
    ]
    for url, entry in zip(record.result_urls, record.archived, strict=True):
        stored = (tmp_path / record.job_id / Path(entry.location).name).read_bytes()
        assert sha256_of(stored) == sha256_of(requests.get(url, timeout=5).content)
        assert entry.sha256 == sha256_of(stored)


def test_a_worker_refuses_loopback_result_urls_by_default(
    sandbox: ManagedProcess, start_workers: StartWorkers, tmp_path: Path
) -> None:
    settings = {**ARCHIVE_SETTINGS, "REMIX_ARCHIVE_ALLOW_PRIVATE": "0"}
    start_workers(REMIX_ARCHIVE_URL=tmp_path.as_uri(), **settings)
    record = archived_job(unique_prompt("archive-refused"), state="failed")

    assert record.archive is not None and record.archive.attempts == 1
    assert record.archive.last_error == "image 0: refused: not a public address"
    assert record.archived == [] and list(tmp_path.iterdir()) == []


def test_a_worker_archives_a_job_to_s3(
    sandbox: ManagedProcess, start_workers: StartWorkers, moto_s3: S3Server
) -> None:
    [worker] = start_workers(
        REMIX_ARCHIVE_URL=f"s3://{moto_s3.bucket}/e2e",
        REMIX_ARCHIVE_S3_ENDPOINT_URL=moto_s3.endpoint_url,
        **AWS_TEST_ENV,
        **ARCHIVE_SETTINGS,
    )
    record = archived_job(unique_prompt("archive-s3"))

    s3 = moto_s3.client()
    for n, (url, entry) in enumerate(zip(record.result_urls, record.archived, strict=True)):
        key = f"e2e/{record.job_id}/{n}.png"
        assert entry.location == f"s3://{moto_s3.bucket}/{key}"
        stored = s3.get_object(Bucket=moto_s3.bucket, Key=key)["Body"].read()
        assert sha256_of(stored) == sha256_of(requests.get(url, timeout=5).content)
    log = worker.log_path.read_text() if worker.log_path else ""
    assert "archived" in log
    for secret in (AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"], SECRET_API_KEY):
        assert secret not in log
        assert secret not in record.model_dump_json()


def test_the_webhook_of_an_archived_job_says_where_its_images_are(
    sandbox: ManagedProcess,
    start_workers: StartWorkers,
    tmp_path: Path,
    producer_allows_loopback: None,
) -> None:
    start_workers(
        REMIX_ARCHIVE_URL=tmp_path.as_uri(), REMIX_NOTIFY_ALLOW_PRIVATE="1", **ARCHIVE_SETTINGS
    )
    with receiver() as hooks:
        record = archived_job(unique_prompt("archive-hook"), notify_url=hooks.url("/done"))
        [delivery] = wait_until(lambda: hooks.deliveries("/done"), 30, interval=0.1)
    body = json.loads(delivery.body)
    assert body["job_id"] == record.job_id and body["state"] == "succeeded"
    assert body["archive"]["state"] == "done"
    assert [a["location"] for a in body["archived"]] == [a.location for a in record.archived]
