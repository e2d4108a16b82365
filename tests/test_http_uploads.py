"""``POST /v1/jobs:upload``: source images as multipart files, on real uvicorn and Redis.

No worker runs here: these tests check what the route answers and what it writes (the
record, the blobs, the submit message); the worker's side is in ``test_pipeline_files``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from producers.http.guard import UPLOAD_BODY_MAX
from sandbox.images import render_png
from sandbox.launch import ManagedProcess, start_api
from tests.conftest import TEST_REDIS_URL
from worker import keys

pytestmark = pytest.mark.integration
TOKEN = f"tok-{uuid.uuid4().hex}"
IMAGE = render_png("http-upload", 0, "http upload", "square")
REFERENCE = "https://example.test/ref.png"


@pytest.fixture(scope="module")
def api(redis_client: redis.Redis, log_dir: Path) -> Iterator[ManagedProcess]:
    env = {
        "REDIS_URL": TEST_REDIS_URL,
        "RESULT_BACKEND_URL": TEST_REDIS_URL,
        "REMIX_API_TOKENS": TOKEN,
        "KIE_CALLBACK_URL": "",
    }
    process = start_api(env, log_path=log_dir / "http-uploads.log")
    yield process
    process.stop()


@pytest.fixture
def client(api: ManagedProcess) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=str(api.url), timeout=30, headers=headers) as http:
        yield http


def form(request: dict[str, Any], *files: tuple[str, str, bytes]) -> dict[str, Any]:
    """httpx arguments for a multipart body: the request part and ``(part, name, bytes)``."""
    return {
        "data": {"request": json.dumps(request)},
        "files": [(part, (name, data, "application/octet-stream")) for part, name, data in files],
    }


def written(client: redis.Redis) -> tuple[int, int]:
    return (
        len(list(client.scan_iter(keys.JOB_PREFIX + "*"))),
        len(list(client.scan_iter(keys.blob("*")))),
    )


def test_an_upload_enqueues_a_job_whose_request_names_its_blobs(
    client: httpx.Client, redis_client: redis.Redis
) -> None:
    body = form(
        {"prompt": "uploaded", "reference_image_urls": [REFERENCE], "provider": "kie"},
        ("image_file", "me.png", IMAGE),
        ("reference_image_file", "pal.txt", IMAGE),
    )

    answer = client.post("/v1/jobs:upload", **body)

    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]
    assert answer.headers["Location"] == f"/v1/jobs/{job_id}"
    stored = json.loads(redis_client.hget(keys.job(job_id), "_request"))  # type: ignore[arg-type]
    assert stored["image_file"]["name"] == "me.png"
    assert [ref["name"] for ref in stored["reference_image_files"]] == ["pal.png"]
    assert redis_client.get(keys.blob(stored["image_file"]["blob"])) == IMAGE


def test_a_bad_file_answers_422_in_one_line_and_writes_nothing(
    client: httpx.Client, redis_client: redis.Redis
) -> None:
    before = written(redis_client)
    body = form(
        {"prompt": "x", "reference_image_urls": [REFERENCE]},
        ("image_file", "cat.png", b"this is text, not a PNG"),
    )

    answer = client.post("/v1/jobs:upload", **body)

    assert answer.status_code == 422
    [error] = answer.json()["detail"]
    assert error["loc"] == ["body", "image_file"]
    assert "not a whole JPEG, PNG or WebP" in error["msg"]
    assert "\n" not in error["msg"]
    assert written(redis_client) == before


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"prompt": "x"}, "at least one reference image"),
        (
            {"prompt": "x", "image_url": REFERENCE, "reference_image_urls": [REFERENCE]},
            "exactly one",
        ),
        ({"prompt": "x", "reference_image_urls": [REFERENCE], "colour": "red"}, "colour"),
        ({"prompt": "x", "reference_image_urls": [REFERENCE], "provider": "nope"}, "provider"),
        ({"prompt": "x", "reference_image_urls": [REFERENCE], "provider": []}, "provider"),
        (
            {"prompt": "x", "reference_image_files": [{"blob": "someone-else"}]},
            "reference_image_files: files are taken by the image_file and reference_image_file",
        ),
    ],
)
def test_a_bad_request_part_answers_422_and_writes_nothing(
    client: httpx.Client, redis_client: redis.Redis, request_fields: dict[str, Any], message: str
) -> None:
    before = written(redis_client)

    answer = client.post("/v1/jobs:upload", **form(request_fields, ("image_file", "a.png", IMAGE)))

    assert answer.status_code == 422 and message in answer.text
    assert written(redis_client) == before


def test_a_repeat_with_its_key_answers_the_same_job_and_another_file_409(
    client: httpx.Client, redis_client: redis.Redis
) -> None:
    request = {
        "prompt": "idem",
        "reference_image_urls": [REFERENCE],
        "idempotency_key": uuid.uuid4().hex,
    }
    first = client.post("/v1/jobs:upload", **form(request, ("image_file", "a.png", IMAGE)))
    blobs = written(redis_client)[1]

    again = client.post("/v1/jobs:upload", **form(request, ("image_file", "a.png", IMAGE)))
    other = render_png("another", 0, "another", "square")
    clash = client.post("/v1/jobs:upload", **form(request, ("image_file", "a.png", other)))

    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["job_id"] == first.json()["job_id"]
    assert clash.status_code == 409
    assert written(redis_client)[1] == blobs


def test_the_upload_route_needs_a_token(api: ManagedProcess) -> None:
    body = form(
        {"prompt": "x", "reference_image_urls": [REFERENCE]}, ("image_file", "a.png", IMAGE)
    )
    answer = httpx.post(f"{api.url}/v1/jobs:upload", timeout=10, **body)
    assert answer.status_code == 401


def test_a_body_over_the_upload_cap_answers_413(client: httpx.Client) -> None:
    body = form(
        {"prompt": "x", "reference_image_urls": [REFERENCE]},
        ("image_file", "big.png", IMAGE + b"\0" * UPLOAD_BODY_MAX),
    )
    assert client.post("/v1/jobs:upload", **body).status_code == 413


def test_the_json_route_refuses_files_and_file_only_providers(client: httpx.Client) -> None:
    with_file = {"prompt": "x", "image_file": {"blob": "abc"}, "reference_image_urls": [REFERENCE]}
    relay = {"prompt": "x", "image_url": REFERENCE, "reference_image_urls": [REFERENCE]}

    refused = client.post("/v1/jobs", json=with_file)
    relay_refused = client.post("/v1/jobs", json={**relay, "provider": "ideogram-remix"})
    kie = client.post("/v1/jobs", json={**relay, "provider": "kie"})

    assert refused.status_code == 422 and "/v1/jobs:upload" in refused.text
    assert relay_refused.status_code == 422 and "/v1/jobs:upload" in relay_refused.text
    assert kie.status_code == 202 and kie.json()["provider"] == "kie"


def test_a_form_it_cannot_read_answers_422_not_400(client: httpx.Client) -> None:
    many = {f"field{n}": "x" for n in range(40)}
    too_many = client.post("/v1/jobs:upload", data=many, files=[("image_file", ("a.png", IMAGE))])
    unknown = client.post("/v1/jobs:upload", data={"request": "{}", "other": "x"})
    no_boundary = client.post(
        "/v1/jobs:upload", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"}
    )

    assert [a.status_code for a in (too_many, unknown, no_boundary)] == [422, 422, 422]
    assert "other" in unknown.text
