"""The HTTP app's pure parts: cursors, bearer tokens, body caps, counter families."""

from __future__ import annotations

import base64
import json

import pytest
from fastapi.exceptions import RequestValidationError

from producers.http.guard import (
    BATCH_BODY_MAX,
    BODY_CAPS,
    JOB_BODY_MAX,
    OTHER_BODY_MAX,
    authorized,
    body_cap,
    caller_tenant,
    needs_token,
    token_tenant,
)
from producers.http.jobs import JobRequest, decode_cursor, encode_cursor
from producers.http.metrics import counter_families
from worker.models import JobState


def test_a_cursor_round_trips_exactly() -> None:
    position = (1795914635.1469831, "9b29f119c89045e085061b6f2e38a7b4")

    cursor = encode_cursor(JobState.QUEUED, position)

    assert decode_cursor(cursor, JobState.QUEUED) == position
    assert "=" not in cursor and "/" not in cursor and "+" not in cursor


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "!!!",
        _b64(b"not json"),
        _b64(b"\xff\xfe"),
        _b64(b"{}"),
        _b64(b"[1, 2]"),
        _b64(json.dumps(["failed", 1.0, "x"]).encode()),
        _b64(b'["queued", NaN, "x"]'),
        _b64(b'["queued", Infinity, "x"]'),
        _b64(b'["queued", true, "x"]'),
        _b64(b'["queued", 1.0, ""]'),
        _b64(json.dumps(["queued", 1.0, "x" * 201]).encode()),
        _b64(json.dumps(["queued", "1.0", "x"]).encode()),
        _b64(b"[" * 400 + b"]" * 400),
    ],
)
def test_anything_but_a_cursor_of_the_state_is_refused_as_a_field_error(cursor: str) -> None:
    with pytest.raises(RequestValidationError) as refused:
        decode_cursor(cursor, JobState.QUEUED)

    assert refused.value.errors()[0]["loc"] == ("query", "cursor")


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("Bearer tok-a", True),
        ("bearer tok-b", True),
        ("Bearer  tok-a ", True),
        ("Bearer tok-c", False),
        ("Bearer tok-a,tok-b", False),
        ("Bearer ", False),
        ("Basic tok-a", False),
        ("tok-a", False),
        ("Bearer tök-a", False),
        (None, False),
    ],
)
def test_a_bearer_token_must_be_one_of_the_tokens(header: str | None, ok: bool) -> None:
    found = token_tenant(header, {"tok-a": "svc-a", "tok-b": "default"})
    assert (found is not None) is ok


def test_without_tokens_every_caller_is_authorized_and_with_them_only_a_token() -> None:
    assert authorized(None, {}) and authorized("Bearer anything", {})
    assert authorized("Bearer tok-a", {"tok-a": "default"})
    assert not authorized(None, {"tok-a": "default"})
    assert not authorized("Bearer tok-b", {"tok-a": "default"})


def test_the_token_names_the_callers_tenant_and_without_tokens_it_is_the_default() -> None:
    tokens = {"tok-a": "svc-a", "tok-b": "svc-b", "tok-c": "default"}
    assert caller_tenant("Bearer tok-a", tokens) == "svc-a"
    assert caller_tenant("Bearer tok-b", tokens) == "svc-b"
    assert caller_tenant("Bearer tok-c", tokens) == "default"
    assert caller_tenant("Bearer tok-d", tokens) is None
    assert caller_tenant(None, {}) == "default" and caller_tenant("Bearer x", {}) == "default"


def test_public_paths_need_no_token() -> None:
    assert not needs_token("/healthz") and not needs_token("/openapi.json")
    assert not needs_token("/v1/callbacks/kie")
    assert needs_token("/v1/jobs") and needs_token("/metrics") and needs_token("/healthz/x")


def test_each_route_has_its_body_cap() -> None:
    assert body_cap("POST", "/v1/jobs") == JOB_BODY_MAX
    assert body_cap("POST", "/v1/jobs:batch") == BATCH_BODY_MAX
    assert body_cap("POST", "/v1/jobs/abc/cancel") == OTHER_BODY_MAX
    assert body_cap("POST", "/v1/callbacks/kie") is None  # the route caps its own


def test_every_body_cap_names_a_route_the_app_serves() -> None:
    """A renamed route keeps its cap (else its bodies would be held to 4 KiB)."""
    from producers.http import app

    paths = app.openapi()["paths"]
    served = {(method.upper(), path) for path, operations in paths.items() for method in operations}
    assert set(BODY_CAPS) <= served, set(BODY_CAPS) - served


def test_a_batch_of_1000_full_prompts_fits_its_cap() -> None:
    item = {
        "prompt": "p" * 5000,
        "negative_prompt": "n" * 500,
        "image_url": "https://example.com/a-source-image.png",
        "reference_image_urls": ["https://example.com/a-reference-image.png"],
        "idempotency_key": "k" * 64,
    }
    assert len(json.dumps({"jobs": [item] * 1000})) < BATCH_BODY_MAX
    assert len(json.dumps({**item, "prompt": "字" * 5000})) < JOB_BODY_MAX  # as \\u escapes


def test_stored_counters_become_families_with_a_label_after_the_colon() -> None:
    stored = {
        "create_task_total:200": 5,
        "create_task_total:429": 2,
        "retries_total": 3,
        "pauses_total:455": 1,
        "not a name:x": 9,
    }

    families = {family.name: family for family in counter_families(stored)}

    create = families["remixq_create_task"]
    assert {(s.labels["code"], s.value) for s in create.samples} == {("200", 5), ("429", 2)}
    assert families["remixq_pauses"].samples[0].labels == {"reason": "455"}
    assert families["remixq_retries"].samples[0].value == 3
    assert families["remixq_limiter_waits"].samples[0].value == 0  # declared before counted
    assert not any("not a name" in name for name in families)


def test_the_documented_schema_says_what_the_validators_check() -> None:
    properties = JobRequest.model_json_schema()["properties"]

    assert properties["image_url"]["pattern"].startswith("^[Hh][Tt][Tt][Pp]")
    assert properties["prompt"]["pattern"] == r"\S"
    strength = properties["strength"]["anyOf"][0]
    assert (strength["minimum"], strength["maximum"]) == (0.1, 1.0)
    assert {"type": "integer", "minimum": 1, "maximum": 4} in properties["num_images"]["anyOf"]
