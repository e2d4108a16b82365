"""The other blob stores: a shared directory and S3 (moto's server, over HTTP on 127.0.0.1).

The Redis store is the default and is covered with the policies in ``test_policy_files``;
here each other store keeps and returns a job's image, reports a missing one, and serves
the submit step as the Redis one does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import redis

from sandbox.images import render_png
from sandbox.launch import LOOPBACK, ManagedProcess, free_port
from sandbox.server import SandboxServer
from tests.helpers import wait_until
from tests.policy_kit import make_services, stored_ref, submit_now
from worker.store.blobs import BlobMissing, BlobStoreError, FileBlobStore, new_ref
from worker.store.blobs_s3 import S3BlobStore

pytestmark = pytest.mark.integration
IMAGE = render_png("blob-stores", 0, "blob stores", "square")
BUCKET = "remixq-blobs"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto in server mode on a free loopback port, with an empty bucket."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    server = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)]
    with log.open("wb") as out:
        popen = subprocess.Popen(server, stdout=out, stderr=out, start_new_session=True)
    with ManagedProcess(popen, log_path=log):
        url = f"http://{LOOPBACK}:{port}"
        client = boto3.client("s3", endpoint_url=url, **_credentials())
        wait_until(lambda: _answers(client), timeout=30)
        client.create_bucket(Bucket=BUCKET)
        yield url


def _credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


def _answers(client: object) -> bool:
    try:
        client.list_buckets()  # type: ignore[attr-defined]
    except Exception:
        return False
    return True


@pytest.fixture
def s3_env(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """boto3's own configuration pointed at the moto server (as a deployment sets it)."""
    for name, value in {**S3_ENV, "AWS_ENDPOINT_URL_S3": s3_url}.items():
        monkeypatch.setenv(name, value)
    return s3_url


def test_s3_keeps_returns_and_deletes_a_blob(s3_env: str) -> None:
    store = S3BlobStore(BUCKET, f"t-{uuid.uuid4().hex[:6]}/")
    ref = new_ref(IMAGE, "image/png", "a.png")

    store.store([(ref, IMAGE)])
    assert store.get(ref) == IMAGE
    store.delete([ref])

    with pytest.raises(BlobMissing, match=r"a\.png"):
        store.get(ref)


def test_an_unreachable_s3_is_one_line_without_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{LOOPBACK}:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = S3BlobStore(BUCKET, "x/")
    ref = new_ref(IMAGE, "image/png", "a.png")

    with pytest.raises(BlobStoreError) as caught:
        store.store([(ref, IMAGE)])

    assert "\n" not in str(caught.value) and "testing" not in str(caught.value)


def test_a_directory_keeps_a_blob_and_prunes_old_ones(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs", ttl_s=60)
    old, new = (new_ref(IMAGE, "image/png", f"{n}.png") for n in "ab")
    store.store([(old, IMAGE)])
    past = time.time() - 120
    os.utime(tmp_path / "blobs" / old.blob, (past, past))

    store.store([(new, IMAGE)])

    assert store.get(new) == IMAGE
    with pytest.raises(BlobMissing):
        store.get(old)
    assert [p.name for p in (tmp_path / "blobs").iterdir()] == [new.blob]


@pytest.mark.parametrize("where", ["s3", "file"])
def test_the_submit_step_uploads_from_any_store(
    where: str,
    request: pytest.FixtureRequest,
    policy_redis: redis.Redis,
    upstream: SandboxServer,
    tmp_path: Path,
) -> None:
    url = f"s3://{BUCKET}/jobs" if where == "s3" else f"file://{tmp_path}/blobs"
    if where == "s3":
        request.getfixturevalue("s3_env")
    svc = make_services(upstream.url, remix_blob_url=url)
    ref = stored_ref(svc, IMAGE, "me.png")
    job_id = uuid.uuid4().hex
    request_fields = {
        "prompt": f"stores {where}",
        "image_file": ref.model_dump(),
        "reference_image_urls": ["https://example.test/r.png"],
    }
    svc.store.create(job_id, request_fields, due_in=0.0)

    assert submit_now(svc, job_id) == "accepted"

    assert upstream.stats()["upload_requests"] == 1
    assert policy_redis.keys("remixq:blob:*") == []
