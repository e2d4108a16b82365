"""Source images given as files, in the submit policy: real Redis, the sandbox, no worker.

A job's files are in the blob store; the submit step uploads them to the sandbox's File
Upload endpoint just before createTask and sends the URLs it answered. These tests check
what the sandbox received, what the job remembers, and that the blobs go when it ends.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

import pytest
import redis
import requests

from sandbox.images import render_png
from sandbox.server import SandboxServer
from tests.policy_kit import make_services, stored_ref, submit_now
from worker import keys
from worker.fields import BlobRef
from worker.models import JobState
from worker.policies import cancelling
from worker.policies.outcome import fail_job
from worker.services import Services
from worker.store.blobs import BlobMissing, BlobStoreFull, RedisBlobStore, new_ref
from worker.store.jobs import UPLOADS_FIELD
from worker.upstreams.kie_upload import UPLOAD_LIFETIME_S

pytestmark = pytest.mark.policy


def png(label: str) -> bytes:
    return render_png(label, 0, label, "square")


def file_job(svc: Services, ref: BlobRef, **fields: Any) -> tuple[str, str]:
    """A queued job whose source image is ``ref``; returns ``(job_id, prompt)``."""
    prompt = f"files {uuid.uuid4().hex[:10]}"
    request = {
        "prompt": prompt,
        "image_file": ref.model_dump(),
        "reference_image_urls": ["https://example.test/ref.png"],
        **fields,
    }
    job_id = uuid.uuid4().hex
    svc.store.create(job_id, request, due_in=0.0)
    return job_id, prompt


def sent_input(upstream: SandboxServer, svc: Services, job_id: str) -> dict[str, Any]:
    """The createTask ``input`` the sandbox recorded for the job's task."""
    record = svc.store.get(job_id)
    assert record is not None and record.upstream_task_id
    info = requests.get(
        f"{upstream.url}/api/v1/jobs/recordInfo",
        params={"taskId": record.upstream_task_id},
        headers={"Authorization": f"Bearer {svc.settings.kie_api_key.get_secret_value()}"},  # type: ignore[union-attr]
        timeout=5,
    ).json()["data"]
    return dict(json.loads(info["param"])["input"])


def uploads(upstream: SandboxServer) -> list[str]:
    return list(upstream.stats()["uploaded_sha256"])


def test_a_file_is_uploaded_then_its_url_is_sent(svc: Services, upstream: SandboxServer) -> None:
    data = png("upload-then-create")
    ref = stored_ref(svc, data)
    job_id, _ = file_job(
        svc, ref, reference_image_files=[stored_ref(svc, png("r"), "r.png").model_dump()]
    )

    assert submit_now(svc, job_id) == "accepted"

    task_input = sent_input(upstream, svc, job_id)
    assert uploads(upstream) == [
        hashlib.sha256(data).hexdigest(),
        hashlib.sha256(png("r")).hexdigest(),
    ]
    assert requests.get(task_input["image_url"], timeout=5).content == data
    # The URLs given first, then the uploaded reference files.
    assert task_input["reference_image_urls"][0] == "https://example.test/ref.png"
    assert requests.get(task_input["reference_image_urls"][1], timeout=5).content == png("r")
    assert "image_file" not in task_input and "reference_image_files" not in task_input
    remembered = svc.store.get_internal(job_id, UPLOADS_FIELD)
    assert remembered[ref.blob]["url"] == task_input["image_url"]


def test_an_upload_answered_500_is_retried_later_without_a_create_task(
    svc: Services, upstream: SandboxServer
) -> None:
    upstream.configure(faults={500: 1.0}, fault_endpoints=["upload"])
    job_id, _ = file_job(svc, stored_ref(svc, png("retry-500")))

    assert submit_now(svc, job_id) == "retry"

    stats = upstream.stats()
    assert stats["upload_by_code"] == {"500": 1} and stats["create_requests"] == 0
    assert svc.store.get_internal(job_id, "_retries") == 1
    assert svc.store.get_internal(job_id, "_last_error")["code"] == "500"
    record = svc.store.get(job_id)
    assert record is not None and record.submit_attempts == 0 and record.state is JobState.QUEUED
    upstream.configure(faults={})
    assert submit_now(svc, job_id) == "accepted"
    assert len(uploads(upstream)) == 1


def test_a_create_task_retry_does_not_upload_again(svc: Services, upstream: SandboxServer) -> None:
    upstream.configure(faults={500: 1.0}, fault_endpoints=["createTask"])
    job_id, _ = file_job(svc, stored_ref(svc, png("no-reupload")))

    assert submit_now(svc, job_id) == "retry"
    first_url = svc.store.get_internal(job_id, UPLOADS_FIELD)
    upstream.configure(faults={})
    assert submit_now(svc, job_id) == "accepted"

    assert upstream.stats()["upload_requests"] == 1
    assert svc.store.get_internal(job_id, UPLOADS_FIELD) == first_url


def test_a_file_uploaded_nearly_three_days_ago_is_uploaded_again(
    svc: Services, upstream: SandboxServer
) -> None:
    ref = stored_ref(svc, png("stale-upload"))
    job_id, _ = file_job(svc, ref)
    old = {
        "url": "http://127.0.0.1:9/gone.png",
        "uploaded_at": svc.clock.now() - UPLOAD_LIFETIME_S + 60,
    }
    svc.store.set_internal(job_id, UPLOADS_FIELD, {ref.blob: old})

    assert submit_now(svc, job_id) == "accepted"

    assert upstream.stats()["upload_requests"] == 1
    assert sent_input(upstream, svc, job_id)["image_url"].startswith(upstream.url + "/uploads/")


def test_a_fresh_upload_is_reused(svc: Services, upstream: SandboxServer) -> None:
    ref = stored_ref(svc, png("fresh-upload"))
    job_id, _ = file_job(svc, ref)
    url = "https://files.example.test/fresh.png"
    svc.store.set_internal(
        job_id, UPLOADS_FIELD, {ref.blob: {"url": url, "uploaded_at": svc.clock.now() - 3600}}
    )

    assert submit_now(svc, job_id) == "accepted"

    assert upstream.stats()["upload_requests"] == 0
    assert sent_input(upstream, svc, job_id)["image_url"] == url


def test_a_missing_blob_fails_the_job_with_one_line(svc: Services, upstream: SandboxServer) -> None:
    ref = new_ref(png("never-stored"), "image/png", "gone.png")
    job_id, _ = file_job(svc, ref)

    assert submit_now(svc, job_id) == "failed"

    record = svc.store.get(job_id)
    assert record is not None and record.fail_code == "image_missing"
    assert record.fail_msg and "\n" not in record.fail_msg and "gone.png" in record.fail_msg
    assert upstream.stats()["create_requests"] == 0


def test_an_upload_in_maintenance_holds_the_job_without_pausing_create_task(
    svc: Services, upstream: SandboxServer
) -> None:
    upstream.configure(faults={455: 1.0}, fault_endpoints=["upload"])
    job_ids = [file_job(svc, stored_ref(svc, png(f"maint-{i}")))[0] for i in range(4)]

    assert [submit_now(svc, job_id) for job_id in job_ids] == ["held"] * 4

    assert svc.pause.state() is None
    assert all(svc.store.get_internal(j, "_retries") is None for j in job_ids)
    assert upstream.stats()["create_requests"] == 0


def test_the_blobs_of_a_job_are_deleted_when_it_finishes(svc: Services) -> None:
    ref = stored_ref(svc, png("finish-deletes"))
    job_id, _ = file_job(svc, ref)
    assert int(svc.store.redis.get(keys.BLOB_BYTES) or 0) == ref.size

    assert fail_job(svc, job_id, "500", "gave up")

    with pytest.raises(BlobMissing):
        svc.blobs.get(ref)
    assert int(svc.store.redis.get(keys.BLOB_BYTES) or 0) == 0


def test_the_blobs_of_a_cancelled_job_are_deleted(svc: Services) -> None:
    ref = stored_ref(svc, png("cancel-deletes"))
    job_id, _ = file_job(svc, ref)

    assert cancelling.cancel(svc, job_id) == "cancelled"

    with pytest.raises(BlobMissing):
        svc.blobs.get(ref)


def test_a_redis_error_while_deleting_blobs_does_not_cost_the_job(
    svc: Services, policy_redis: redis.Redis
) -> None:
    ref = stored_ref(svc, png("delete-error"))
    job_id, _ = file_job(svc, ref)
    policy_redis.set(keys.BLOB_BYTES, "not a number")  # the delete script fails on it

    assert fail_job(svc, job_id, "500", "gave up")

    record = svc.store.get(job_id)
    assert record is not None and record.state is JobState.FAILED


def test_the_cap_refuses_a_store_over_it_and_writes_nothing(policy_redis: redis.Redis) -> None:
    store = RedisBlobStore(policy_redis, ttl_s=60, max_bytes=1000)
    kept = new_ref(b"x" * 600, "image/png", "a.png")
    store.store([(kept, b"x" * 600)])
    refused = [new_ref(b"y" * 300, "image/png", f"{n}.png") for n in "bc"]

    with pytest.raises(BlobStoreFull, match="REMIX_BLOB_MAX_BYTES=1000") as caught:
        store.store([(ref, b"y" * 300) for ref in refused])

    assert "\n" not in str(caught.value)
    assert int(policy_redis.get(keys.BLOB_BYTES) or 0) == 600
    assert not any(policy_redis.exists(keys.blob(ref.blob)) for ref in refused)


def test_expired_blobs_no_longer_count_against_the_cap(policy_redis: redis.Redis) -> None:
    store = RedisBlobStore(policy_redis, ttl_s=1, max_bytes=1000)
    store.store([(new_ref(b"x" * 600, "image/png", "a.png"), b"x" * 600)])
    time.sleep(1.2)

    store.store([(new_ref(b"y" * 600, "image/png", "b.png"), b"y" * 600)])

    assert int(policy_redis.get(keys.BLOB_BYTES) or 0) == 600
    assert policy_redis.zcard(keys.BLOB_EXPIRIES) == 1


def test_an_upload_refused_401_fails_the_job_without_a_create_task(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    svc = make_services(upstream.url, kie_api_key="sk-not-the-sandbox-key")
    job_id, _ = file_job(svc, stored_ref(svc, png("upload-401")))

    assert submit_now(svc, job_id) == "failed"

    record = svc.store.get(job_id)
    assert record is not None and record.fail_code == "401"
    assert record.fail_msg and record.fail_msg.startswith("upload: ")
    assert "sk-not-the-sandbox-key" not in record.fail_msg
    assert upstream.stats()["upload_by_code"] == {"401": 1}
    assert upstream.stats()["create_requests"] == 0


def test_the_sandbox_refuses_an_upload_that_is_not_an_image(
    svc: Services, upstream: SandboxServer
) -> None:
    answer = requests.post(
        f"{upstream.url}/api/file-stream-upload",
        headers={"Authorization": f"Bearer {svc.settings.kie_api_key.get_secret_value()}"},  # type: ignore[union-attr]
        files={"file": ("a.png", b"plain text", "image/png")},
        data={"uploadPath": "remixq", "fileName": "a.png"},
        timeout=5,
    )

    assert answer.status_code == 422 and answer.json()["code"] == 422
    assert upstream.stats()["uploaded_sha256"] == []
