"""Error mapping of upstream answers, in both styles, with plain data."""

from __future__ import annotations

import json

import pytest

from worker.upstreams import errors
from worker.upstreams.kie import error_from_response, parse_retry_after, parse_task_info

RETRYABLE = {429: errors.RateLimitedError, 500: errors.ServerError}
KEY_WIDE = {402: errors.InsufficientCreditsError, 455: errors.MaintenanceError}
PERMANENT = {
    401: errors.UnauthorizedError,
    404: errors.NotFoundError,
    422: errors.ValidationFailedError,
    501: errors.GenerationFailedError,
    505: errors.FeatureDisabledError,
}
ALL_CODES = {**RETRYABLE, **KEY_WIDE, **PERMANENT}


def _body(code: int, msg: str = "upstream says no", data: object = None) -> str:
    return json.dumps({"code": code, "msg": msg, "data": data})


@pytest.mark.parametrize("code", sorted(ALL_CODES))
@pytest.mark.parametrize("style", ["http", "body"])
def test_every_documented_code_maps_to_its_error(code: int, style: str) -> None:
    status = code if style == "http" else 200
    error, data = error_from_response(status, _body(code), {})
    assert isinstance(error, ALL_CODES[code])
    assert data is None
    assert error.fail_code == str(code)
    assert error.message == "upstream says no"
    expected = (
        errors.Family.RETRY
        if code in RETRYABLE
        else errors.Family.KEY
        if code in KEY_WIDE
        else errors.Family.PERMANENT
    )
    assert error.family is expected


def test_http_status_wins_when_body_says_success() -> None:
    error, _ = error_from_response(429, _body(200, "slow down"), {})
    assert isinstance(error, errors.RateLimitedError)


def test_success_returns_data() -> None:
    error, data = error_from_response(200, _body(200, "success", {"taskId": "t1"}), {})
    assert error is None
    assert data == {"taskId": "t1"}


@pytest.mark.parametrize("status", [502, 503])
def test_html_page_is_a_retryable_server_error_with_excerpt(status: int) -> None:
    page = "<html><head><title>502 Bad Gateway</title></head>\n<body>nginx</body></html>"
    error, _ = error_from_response(status, page, {})
    assert isinstance(error, errors.ServerError)
    assert error.family is errors.Family.RETRY
    assert "502 Bad Gateway" in str(error)
    assert "\n" not in str(error)


def test_undocumented_codes() -> None:
    server, _ = error_from_response(503, _body(503), {})
    assert isinstance(server, errors.ServerError) and server.fail_code == "503"
    client, _ = error_from_response(200, _body(418), {})
    assert isinstance(client, errors.UnexpectedCodeError) and client.fail_code == "418"
    assert client.family is errors.Family.PERMANENT


def test_retry_after_seconds_and_date() -> None:
    error, _ = error_from_response(429, _body(429), {"Retry-After": "7"})
    assert error is not None and error.retry_after == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None


def test_secret_echoed_by_upstream_is_redacted() -> None:
    key = "sk-very-secret-123"
    error, _ = error_from_response(401, _body(401, f"bad key Bearer {key}"), {}, (key,))
    assert error is not None
    assert key not in str(error) and key not in error.message
    assert errors.REDACTED in str(error)


def test_parse_task_info_success_and_fail() -> None:
    ok = parse_task_info(
        {
            "taskId": "t1",
            "state": "success",
            "resultJson": json.dumps({"resultUrls": ["http://127.0.0.1/x.png"]}),
        }
    )
    assert ok.result_urls == ["http://127.0.0.1/x.png"]
    failed = parse_task_info({"task_id": "t2", "state": "fail", "failCode": 501, "failMsg": "nsfw"})
    assert (failed.task_id, failed.fail_code, failed.fail_msg) == ("t2", "501", "nsfw")
    with pytest.raises(errors.BadAnswerError):
        parse_task_info({"taskId": "t3", "state": "success", "resultJson": "{}"})
