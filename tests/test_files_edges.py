"""Adversarial tests of images from files: what the producers accept as an image.

Real uvicorn (the HTTP app), real Redis (the test database), no worker: a body the
route accepts is stored in the blob store and enqueued, and a worker would upload it and
pay createTask (or the relay) for it.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
import redis

from sandbox.launch import ManagedProcess
from tests import test_http_uploads
from worker import keys
from worker.models import InvalidRequestError, validate_request

pytestmark = pytest.mark.integration
REFERENCE = "https://example.test/ref.png"

#: Files that carry an image format's magic bytes and nothing of an image after them.
#: The upload route's API process and its token (a module fixture of test_http_uploads).
api = test_http_uploads.api
TOKEN = test_http_uploads.TOKEN

NOT_IMAGES = {
    "webp_header_only": b"RIFF\x00\x00\x00\x00WEBP",
    "png_signature_then_text": b"\x89PNG\r\n\x1a\nthis is a text file, not a PNG",
    "jpeg_soi_then_text": b"\xff\xd8\xffthis is a text file, not a JPEG",
}


@pytest.mark.parametrize("name", sorted(NOT_IMAGES))
def test_magic_bytes_without_an_image_are_refused(
    api: ManagedProcess, redis_client: redis.Redis, name: str
) -> None:
    """README: a file must be a JPEG, PNG or WebP *by its content* ("a text file named
    .png is not"). Magic bytes followed by text are a text file: nothing may be stored or
    enqueued, or a worker uploads it and pays for a task on a non-image."""
    blobs_before = len(list(redis_client.scan_iter(keys.blob("*"))))
    with httpx.Client(base_url=str(api.url), timeout=30) as http:
        answer = http.post(
            "/v1/jobs:upload",
            headers={"Authorization": f"Bearer {TOKEN}"},
            data={
                "request": json.dumps(
                    {"prompt": f"attack {name}", "reference_image_urls": [REFERENCE]}
                )
            },
            files=[("image_file", ("photo.png", NOT_IMAGES[name], "image/png"))],
        )
    blobs_after = len(list(redis_client.scan_iter(keys.blob("*"))))
    assert answer.status_code == 422, (
        f"{name} ({len(NOT_IMAGES[name])} bytes) was accepted as an image: HTTP "
        f"{answer.status_code}, blobs {blobs_before} -> {blobs_after}: {answer.text[:200]}"
    )


def test_a_job_does_not_upload_reference_files_the_model_never_uses(svc, upstream) -> None:  # type: ignore[no-untyped-def]
    """The Python API (and the CLI) take any number of ``reference_image_files`` (the HTTP
    route stops at 8), and the README says the model uses only the first reference. A job
    with 40 reference files makes its worker upload all 40 through the kie key's File
    Upload API in one submit step (each one a request that may be rate-limited, each up
    to the request deadline, all before the attempt) for 39 images nobody uses."""
    from sandbox.images import render_png
    from tests.policy_kit import stored_ref, submit_now

    refs = [
        stored_ref(svc, render_png(f"ref{n}", n, f"ref {n}", "square"), f"ref{n}.png").model_dump()
        for n in range(40)
    ]
    base_ref = stored_ref(svc, render_png("base", 0, "base", "square"))
    job_id = uuid.uuid4().hex
    request = {
        "prompt": f"many refs {job_id[:8]}",
        "image_file": base_ref.model_dump(),
        "reference_image_files": refs,
    }
    with pytest.raises(
        InvalidRequestError, match="reference_image_files: List should have at most 8"
    ):
        validate_request(request)  # what a producer meets before anything is written
    svc.store.create(job_id, request, due_in=0.0)  # a Celery-protocol producer's message

    step = submit_now(svc, job_id)

    uploaded = int(upstream.stats()["upload_requests"])
    assert uploaded <= 2, (
        f"one job made {uploaded} File Upload requests in a single submit step "
        f"(step {step!r}) for a model that uses one source and the first reference"
    )
