"""A local image remixed through kie end to end: a producer, the broker, a real worker.

The file is read by the producer, kept in the blob store and uploaded by the worker to the
sandbox's File Upload endpoint; the Celery message carries a reference only, which is
checked on the broker's queue before any worker starts.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from pathlib import Path

import pytest
import redis
from PIL import Image

from producers import cancel_job, enqueue_remix, wait_for_job
from producers.retry import retry_one
from sandbox.control import SandboxControl
from sandbox.images import render_png
from tests.conftest import StartWorkers, unique_prompt
from tests.helpers import waiting_jobs
from worker import keys
from worker.app import configure, services
from worker.images import MAX_IMAGE_BYTES
from worker.models import InvalidRequestError, JobState
from worker.store.blobs import BlobStoreFull

pytestmark = pytest.mark.integration
REFERENCE = "https://example.test/ref.png"
#: A submit message is a few hundred bytes of JSON; an image is far larger.
SMALL_MESSAGE_BYTES = 4096


def noise_png(side: int = 128) -> bytes:
    """A PNG of random pixels: it does not compress, so it is far larger than a message."""
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, "PNG")
    return out.getvalue()


def written(client: redis.Redis) -> tuple[int, int, int]:
    """Jobs, blobs and queued submits in the test Redis."""
    jobs = len(list(client.scan_iter(keys.JOB_PREFIX + "*")))
    blobs = len(list(client.scan_iter(keys.blob("*"))))
    return jobs, blobs, int(client.llen("submit"))


def test_a_local_png_is_remixed_and_no_message_holds_its_bytes(
    redis_client: redis.Redis,
    control: SandboxControl,
    start_workers: StartWorkers,
    tmp_path: Path,
) -> None:
    data = noise_png()
    path = tmp_path / "portrait.png"
    path.write_bytes(data)
    prompt = unique_prompt("local file")
    job_id = enqueue_remix(prompt, reference_image_urls=[REFERENCE], image_file=path)

    # What the job's remix.submit will carry is its stored request: a reference, no bytes.
    [waiting] = [job for job in waiting_jobs(redis_client) if job["job_id"] == job_id]
    raw = json.dumps(waiting["request"]).encode()
    assert len(data) > 4 * SMALL_MESSAGE_BYTES and len(raw) < SMALL_MESSAGE_BYTES
    assert base64.b64encode(data[16:64]) not in raw and data[16:64] not in raw
    assert waiting["request"]["image_file"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert "image_url" not in waiting["request"]

    start_workers()
    record = wait_for_job(job_id, timeout=60)

    assert record.state is JobState.SUCCEEDED, record.fail_msg
    assert hashlib.sha256(data).hexdigest() in control.stats()["uploaded_sha256"]
    blob = waiting["request"]["image_file"]["blob"]
    assert not redis_client.exists(keys.blob(blob))  # the job's blob left with it


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"just some text, not a picture", "not a whole JPEG, PNG or WebP"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * MAX_IMAGE_BYTES, "bytes allowed"),
    ],
)
def test_a_bad_file_is_refused_at_enqueue_with_nothing_written(
    redis_client: redis.Redis, tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "picture.png"
    path.write_bytes(content)
    before = written(redis_client)

    with pytest.raises(InvalidRequestError, match=message):
        enqueue_remix("x", reference_image_urls=[REFERENCE], image_file=path)

    assert written(redis_client) == before


def test_the_blob_cap_refuses_at_enqueue_with_nothing_written(redis_client: redis.Redis) -> None:
    data = render_png("cap", 0, "cap", "square")
    before = written(redis_client)
    url = services().settings.redis_url
    configure(redis_url=url, result_backend_url=url, remix_blob_max_bytes=len(data) + 10)
    try:
        with pytest.raises(BlobStoreFull, match="REMIX_BLOB_MAX_BYTES"):
            enqueue_remix("x", image_file=data, reference_image_files=[data])
    finally:
        configure(redis_url=url, result_backend_url=url)

    assert written(redis_client) == before


def test_an_idempotent_repeat_leaves_no_new_blob(redis_client: redis.Redis) -> None:
    data = render_png("idem", 0, "idem", "square")
    key = unique_prompt("idem-files")
    first = enqueue_remix(
        "x", image_file=data, reference_image_urls=[REFERENCE], idempotency_key=key
    )
    blobs = written(redis_client)[1]

    again = enqueue_remix(
        "x", image_file=data, reference_image_urls=[REFERENCE], idempotency_key=key
    )

    assert again == first and written(redis_client)[1] == blobs


def test_a_finished_job_whose_images_were_files_is_not_retried(redis_client: redis.Redis) -> None:
    data = render_png("no-retry", 0, "no retry", "square")
    job_id = enqueue_remix("x", image_file=data, reference_image_urls=[REFERENCE])
    cancel_job(job_id)

    outcome = retry_one(job_id)

    assert outcome.skipped is not None and outcome.skipped.reason == "files"
    assert "submit it again" in str(outcome.skipped)
    request = json.loads(redis_client.hget(keys.job(job_id), "_request"))  # type: ignore[arg-type]
    assert not redis_client.exists(keys.blob(request["image_file"]["blob"]))  # gone with the cancel
