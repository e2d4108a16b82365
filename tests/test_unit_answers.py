"""How upstream answers and transport failures become typed errors (plain data, no network).

Each case here was a defect: an answer mapped to the wrong family spends retries it should
not, pauses nothing when it should, or fails a job that should go on.
"""

from __future__ import annotations

import json
import math

import pytest
import requests
import urllib3.exceptions

from worker.upstreams import errors
from worker.upstreams.errors import Family
from worker.upstreams.kie import error_from_response, parse_retry_after, parse_task_info

SECRET = "sk-unit-0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("status", "body", "expected", "family"),
    [
        (429, "<html><h1>429 Too Many Requests</h1></html>", errors.RateLimitedError, "retry"),
        (402, "402 Payment Required: insufficient credits", errors.InsufficientCreditsError, "key"),
        (455, "service under maintenance", errors.MaintenanceError, "key"),
        (401, "401 Unauthorized", errors.UnauthorizedError, "permanent"),
        (404, "not found", errors.NotFoundError, "permanent"),
        (500, "<html>500</html>", errors.ServerError, "retry"),
        (503, "<html>503 Service Unavailable</html>", errors.ServerError, "retry"),
    ],
)
def test_a_non_json_answer_keeps_the_meaning_of_its_http_status(
    status: int, body: str, expected: type[errors.UpstreamError], family: str
) -> None:
    error, data = error_from_response(status, body, {"Retry-After": "3"})
    assert isinstance(error, expected), error
    assert data is None
    assert (
        error.family
        is {"retry": Family.RETRY, "key": Family.KEY, "permanent": Family.PERMANENT}[family]
    )
    assert error.fail_code == str(status)
    if status == 429:
        assert error.retry_after == 3


def test_a_non_json_success_page_is_a_bad_answer_not_a_gateway_error() -> None:
    error, _ = error_from_response(200, "<html>ok?</html>", {})
    assert isinstance(error, errors.BadAnswerError)
    assert error.family is Family.RETRY and error.ambiguous


@pytest.mark.parametrize("code", ["429", " 429 ", 429.0])
def test_a_code_written_as_a_string_or_float_is_still_that_code(code: object) -> None:
    body = json.dumps({"code": code, "msg": "slow down", "data": None})
    error, _ = error_from_response(200, body, {})
    assert isinstance(error, errors.RateLimitedError)


def test_a_success_without_result_json_is_not_a_success() -> None:
    with pytest.raises(errors.BadAnswerError, match="resultJson"):
        parse_task_info({"taskId": "t1", "state": "success", "resultJson": ""})
    with pytest.raises(errors.BadAnswerError, match="resultJson"):
        parse_task_info(
            {"taskId": "t1", "state": "success", "resultJson": json.dumps({"resultUrls": []})}
        )


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e308", "99999999999999999999", "-5"])
def test_retry_after_is_finite_and_capped(value: str) -> None:
    seconds = parse_retry_after(value)
    assert seconds is None or (math.isfinite(seconds) and 0 <= seconds <= errors.MAX_RETRY_AFTER_S)


def test_retry_after_of_a_day_is_capped() -> None:
    assert parse_retry_after("86400") == errors.MAX_RETRY_AFTER_S


@pytest.mark.parametrize(
    ("exc", "ambiguous"),
    [
        (requests.ConnectTimeout("connect timed out"), False),
        (
            requests.ConnectionError(
                urllib3.exceptions.NewConnectionError(None, "refused")  # type: ignore[arg-type]
            ),
            False,
        ),
        (requests.ReadTimeout("read timed out"), True),
        (requests.ConnectionError("Connection aborted: RemoteDisconnected"), True),
        (requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead"), True),
        (requests.exceptions.ContentDecodingError("bad gzip"), True),
    ],
)
def test_every_transport_failure_is_a_retryable_network_error(
    exc: requests.RequestException, ambiguous: bool
) -> None:
    error = errors.error_for_exception(exc, "http://127.0.0.1:1")
    assert isinstance(error, errors.NetworkError)
    assert error.family is Family.RETRY
    assert error.ambiguous is ambiguous


@pytest.mark.parametrize(
    "exc",
    [
        requests.exceptions.InvalidHeader("Invalid leading whitespace in header value"),
        requests.exceptions.InvalidURL("bad url"),
        requests.exceptions.MissingSchema("no schema"),
        requests.exceptions.TooManyRedirects("loop"),
        requests.RequestException("anything else"),
    ],
)
def test_any_other_request_exception_lands_in_a_family(exc: requests.RequestException) -> None:
    error = errors.error_for_exception(exc, "http://127.0.0.1:1")
    assert error.family in set(Family)


def test_a_secret_spanning_the_excerpt_cut_leaves_no_prefix() -> None:
    page = "<html>" + "x" * 150 + f" key={SECRET} " + "y" * 100 + "</html>"
    error, _ = error_from_response(502, page, {}, secrets=(SECRET,))
    assert error is not None
    assert SECRET[:10] not in str(error)
    assert SECRET[:10] not in error.message


def test_an_escaped_secret_with_a_newline_is_redacted() -> None:
    keyed = SECRET + "\n"
    text = f"Invalid header value b'Bearer {keyed!r}'"
    error = errors.error_for_exception(requests.exceptions.InvalidHeader(text), "http://x")
    assert SECRET[:10] not in errors.redact(str(error), (keyed,))
