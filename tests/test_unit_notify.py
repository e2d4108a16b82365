"""Completion webhooks, the parts that need no Redis: signing, ids, settings, batch lines."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from producers.api import check_notify_url
from producers.cli import parse_assignments, parse_batch_line
from worker.fleet.dispatcher import _slots_of
from worker.models import InvalidRequestError, JobRecord, JobState, Notification
from worker.policies.notify import (
    delivery_id,
    describe_request_error,
    signature,
    webhook_body,
    webhook_headers,
)
from worker.settings import ConfigurationError, load_settings

PRODUCERS_DOC = Path(__file__).resolve().parents[1] / "docs" / "producers.md"
LINE = {
    "prompt": "a knight",
    "image_url": "https://example.com/a.png",
    "reference_image_urls": ["https://example.com/b.png"],
}


def _record(job_id: str = "job-1", finished_at: float = 1700000012.5) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        state=JobState.SUCCEEDED,
        created_at=1700000000.0,
        finished_at=finished_at,
        result_urls=["https://example.test/1.png"],
        notification=Notification(state="pending"),
    )


def test_the_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"job_id":"x"}'
    expected = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature("k", "1700000000", body) == "sha256=" + expected


def test_the_documented_receiver_snippet_accepts_ours_and_refuses_others() -> None:
    blocks = re.findall(r"```python\n(.*?)```", PRODUCERS_DOC.read_text(), flags=re.S)
    [snippet] = [b for b in blocks if "def verify_remixq_webhook" in b]
    namespace: dict[str, Any] = {}
    exec(compile(snippet, str(PRODUCERS_DOC), "exec"), namespace)
    verify = namespace["verify_remixq_webhook"]
    settings = load_settings(remix_notify_hmac_key="whsec-unit")
    record = _record()
    body = webhook_body(record)
    headers = webhook_headers(settings, record, str(int(time.time())), body)

    assert verify("whsec-unit", headers, body)["job_id"] == "job-1"
    with pytest.raises(ValueError):
        verify("whsec-other", headers, body)
    with pytest.raises(ValueError):
        verify("whsec-unit", headers, body + b" ")
    stale = webhook_headers(settings, record, str(int(time.time()) - 3600), body)
    with pytest.raises(ValueError, match="stale"):
        verify("whsec-unit", stale, body)


def test_the_body_is_the_public_record_plus_its_delivery_id() -> None:
    record = _record()
    body = json.loads(webhook_body(record))
    assert body.pop("delivery_id") == delivery_id(record)
    assert body == record.model_dump(mode="json")


def test_a_delivery_id_is_stable_per_job_and_differs_between_jobs() -> None:
    assert delivery_id(_record()) == delivery_id(_record())
    assert delivery_id(_record("job-1")) != delivery_id(_record("job-2"))
    # A job id reused after its record expired is another delivery.
    assert delivery_id(_record(finished_at=1.0)) != delivery_id(_record(finished_at=2.0))


def test_without_a_key_no_signature_header_is_sent() -> None:
    headers = webhook_headers(load_settings(), _record(), "1", b"{}")
    assert "X-Remixq-Signature" not in headers
    assert headers["X-Remixq-Delivery"] == delivery_id(_record())


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"remix_notify_retry_base_s": 10, "remix_notify_retry_max_s": 5}, "REMIX_NOTIFY_RETRY"),
        ({"remix_notify_timeout_s": 61}, "REMIX_NOTIFY_TIMEOUT_S"),
        ({"remix_notify_timeout_s": 0}, "REMIX_NOTIFY_TIMEOUT_S"),
        ({"remix_notify_max_attempts": 0}, "REMIX_NOTIFY_MAX_ATTEMPTS"),
    ],
)
def test_bad_webhook_settings_are_refused(overrides: dict[str, Any], variable: str) -> None:
    with pytest.raises(ConfigurationError, match=variable):
        load_settings(**overrides)


def test_a_batch_line_may_name_its_webhook() -> None:
    item = parse_batch_line(1, json.dumps({**LINE, "notify_url": "https://hooks.example.com/x"}))
    assert item.notify_url == "https://hooks.example.com/x"
    assert "notify_url" not in item.fields
    assert parse_batch_line(2, json.dumps(LINE)).notify_url is None


def test_a_notify_url_longer_than_2000_characters_is_refused() -> None:
    url = "https://hooks.example.com/" + "x" * 2000
    with pytest.raises(InvalidRequestError) as caught:
        check_notify_url(url, allow_private=False)
    assert str(caught.value) == "invalid request: notify_url: a URL of more than 2000 characters"
    check_notify_url(url[:2000], allow_private=False)


@pytest.mark.parametrize("url", ["ftp://hooks.example.com/x", 42, "https://u:p@example.com/"])
def test_a_batch_line_with_a_bad_webhook_is_refused(url: object) -> None:
    with pytest.raises(ValueError, match="notify_url"):
        parse_batch_line(1, json.dumps({**LINE, "notify_url": url}))


def test_notify_url_has_its_own_option() -> None:
    from producers.cli import BadInput

    with pytest.raises(BadInput, match="--notify-url"):
        parse_assignments(["notify_url=https://hooks.example.com/x"])


@pytest.mark.parametrize(
    ("member", "slots"), [(b"host:12 4", 4), ("host:12 16", 16), (b"garbled", 1), (b"h:1 x", 1)]
)
def test_worker_slots_are_read_from_heartbeats(member: bytes | str, slots: int) -> None:
    assert _slots_of(member) == slots


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (requests.exceptions.SSLError("https://h/secret?token=1"), "TLS handshake failed"),
        (requests.ConnectTimeout("https://h/secret?token=1"), "timed out"),
        (requests.ConnectionError("https://h/secret?token=1"), "connection failed"),
        (requests.exceptions.InvalidHeader("https://h/secret?token=1"), "InvalidHeader"),
    ],
)
def test_a_failed_try_is_described_without_its_url(
    exc: requests.RequestException, text: str
) -> None:
    described = describe_request_error(exc, expired=False, total=10)
    assert text in described and "secret" not in described
    assert describe_request_error(exc, expired=True, total=10) == "no answer within 10 s"
