"""HTTP client for the kie.ai market API (``ideogram/character-remix``).

Every answer becomes either parsed data or a typed error from :mod:`worker.upstreams.errors`. The
code may come as ``code`` in a JSON body or as the HTTP status; when the body is not JSON
(a proxy's HTML page, a plain-text error) the HTTP status alone decides, so an HTML 429
still holds the fleet and a plain-text 402 still pauses the key. Every request has a
total deadline (:mod:`worker.net.deadline`), so no single request outlives the job's lease, and
an answer is read up to :data:`MAX_ANSWER_BYTES` only: a longer one is unreadable, like
one that is not JSON.

The ``Authorization`` header is only ever set on the session: it is never formatted into
a message, upstream text is redacted before it is shortened, and transport exceptions
(whose text may quote a header) are replaced by messages of our own.
"""

from __future__ import annotations

import codecs
import email.utils
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import urllib3
from pydantic import SecretStr
from requests.utils import get_encoding_from_headers
from urllib3 import encode_multipart_formdata

from worker.net.deadline import UpstreamSession, deadline
from worker.redaction import redactor_for
from worker.upstreams.errors import (
    MAX_RETRY_AFTER_S,
    BadAnswerError,
    NetworkError,
    RequestBuildError,
    ServerError,
    UpstreamError,
    error_for_code,
    error_for_exception,
    excerpt,
)

MODEL = "ideogram/character-remix"
CREATE_TASK_PATH = "/api/v1/jobs/createTask"
RECORD_INFO_PATH = "/api/v1/jobs/recordInfo"
CREDIT_PATH = "/api/v1/chat/credit"
SUCCESS_CODE = 200
#: The largest answer read from an upstream; the answers are small JSON (a task id, a
#: state, a few URLs), so a longer one is a broken or hostile upstream and is not read on.
MAX_ANSWER_BYTES = 1024 * 1024
#: An answer is read this much at a time (so at most this much past the cap).
READ_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class TaskInfo:
    """What ``recordInfo`` (or a callback) says about one upstream task."""

    task_id: str
    state: str
    result_urls: list[str] = field(default_factory=list)
    fail_code: str | None = None
    fail_msg: str | None = None
    create_time: int | None = None
    complete_time: int | None = None
    cost_time: int | None = None
    #: The createTask body as the upstream recorded it (JSON text), when it says.
    param: str | None = None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date).

    Nonsense (``inf``, ``nan``, garbage) is ignored; the result is at least 0 and at most
    :data:`~worker.upstreams.errors.MAX_RETRY_AFTER_S`, so no header can stop the fleet for a day.
    """
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        seconds = when.timestamp() - (now if now is not None else time.time())
    if not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


def parse_result_urls(raw: Any) -> list[str]:
    """``resultJson`` is a JSON *string* holding ``{"resultUrls": [...]}`` (at least one)."""
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
    except (ValueError, RecursionError):
        data = None
    urls = data.get("resultUrls") if isinstance(data, dict) else None
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise BadAnswerError("success without result URLs in resultJson")
    return urls


def _optional_str(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _optional_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_task_info(data: Any) -> TaskInfo:
    """Parse the ``data`` object of a recordInfo answer or of a callback."""
    if not isinstance(data, dict):
        raise BadAnswerError("recordInfo data is not an object")
    task_id = data.get("taskId") or data.get("task_id")
    state = data.get("state")
    if not task_id or not isinstance(state, str):
        raise BadAnswerError("recordInfo data lacks taskId or state")
    urls = parse_result_urls(data.get("resultJson")) if state == "success" else []
    return TaskInfo(
        task_id=str(task_id),
        state=state,
        result_urls=urls,
        fail_code=_optional_str(data.get("failCode")),
        fail_msg=_optional_str(data.get("failMsg")),
        create_time=_optional_int(data.get("createTime")),
        complete_time=_optional_int(data.get("completeTime")),
        cost_time=_optional_int(data.get("costTime")),
        param=data.get("param") if isinstance(data.get("param"), str) else None,
    )


def parse_credit(data: Any) -> int:
    """The ``data`` of a credit answer: a finite number of credits."""
    if isinstance(data, bool) or not isinstance(data, int | float) or not math.isfinite(data):
        raise BadAnswerError("credit answer is not a finite number")
    return int(data)


def _read_code(value: Any) -> int | None:
    """A body's ``code`` as an int: ``429``, ``"429"`` and ``429.0`` alike; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def unreadable_error(status: int, message: str, retry_after: float | None) -> UpstreamError:
    """The error for an answer whose body cannot be read (``message`` says why).

    The HTTP status decides; a 200 is a malformed answer, and a 5xx page is a gateway's,
    which may have passed the request on (both ambiguous: for createTask the task may
    exist).
    """
    if status == SUCCESS_CODE:
        return BadAnswerError(message)
    if status >= 500:
        return ServerError(message, retry_after=retry_after, status=status, ambiguous=True)
    return error_for_code(status, message, retry_after=retry_after)


def non_json_error(status: int, text: str, retry_after: float | None) -> UpstreamError:
    """The error for an answer that is not a JSON object (``text`` already redacted)."""
    shown = excerpt(text)
    if status == SUCCESS_CODE:
        return unreadable_error(status, f"answer is not a JSON object: {shown}", retry_after)
    return unreadable_error(status, f"non-JSON answer (HTTP {status}): {shown}", retry_after)


def redirect_error(status: int) -> UpstreamError:
    """The error for an answer that redirects (never followed; its target is not named)."""
    message = f"the upstream answered a redirect (HTTP {status}), which is not followed"
    return error_for_code(status, message + "; set the base URL to the final address")


def oversized_error(response: urllib3.BaseHTTPResponse) -> UpstreamError:
    """The error for an answer longer than :data:`MAX_ANSWER_BYTES` (not read in full)."""
    status = response.status
    message = f"answer (HTTP {status}) longer than {MAX_ANSWER_BYTES} bytes, not read"
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    return unreadable_error(status, message, retry_after)


def read_capped(response: urllib3.BaseHTTPResponse, cap: int = MAX_ANSWER_BYTES) -> bytes | None:
    """The body of a streamed answer, or None when it is longer than ``cap`` bytes.

    A declared ``Content-Length`` over the cap is refused before any of the body is read;
    otherwise reading stops at most :data:`READ_CHUNK_BYTES` past the cap (decoded bytes,
    so a compressed body cannot expand past it either).
    """
    declared = (response.headers.get("Content-Length") or "").strip()
    if declared.isascii() and declared.isdigit() and int(declared) > cap:
        return None
    body = bytearray()
    for chunk in response.stream(READ_CHUNK_BYTES):
        body += chunk
        if len(body) > cap:
            return None
    return bytes(body)


def error_from_response(
    status: int, body_text: str, headers: Any, secrets: tuple[str | None, ...] = ()
) -> tuple[UpstreamError | None, Any]:
    """Interpret one HTTP answer: ``(error, None)`` or ``(None, data)``.

    Pure function of the response parts, so it is unit-tested with plain data.
    """
    redactor = redactor_for(secrets)
    retry_after = parse_retry_after(headers.get("Retry-After") if headers else None)
    try:
        body = json.loads(body_text)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        return non_json_error(status, redactor.redact(body_text), retry_after), None
    code = _read_code(body.get("code"))
    if status != SUCCESS_CODE and code in (None, SUCCESS_CODE):
        code = status
    if code is None:
        code = SUCCESS_CODE
    if code != SUCCESS_CODE:
        message = excerpt(redactor.redact(str(body.get("msg") or body.get("message") or "")))
        return error_for_code(code, message, retry_after=retry_after), None
    return None, body.get("data")


def _known_encoding(name: str | None) -> str:
    """The answer's declared charset when Python knows it as a text encoding, else UTF-8
    (a codec such as ``rot13`` or ``base64`` is no charset)."""
    if name:
        try:
            info = codecs.lookup(name)
        except LookupError:
            return "utf-8"
        if getattr(info, "_is_text_encoding", True):
            return info.name
    return "utf-8"


Interpret = Callable[[int, str, Any], tuple[UpstreamError | None, Any]]
#: Answers that redirect: never followed (see :func:`call_upstream`).
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


def encode_request(
    *,
    json_body: Any = None,
    params: dict[str, str] | None = None,
    fields: dict[str, str] | None = None,
    files: dict[str, tuple[str, bytes, str]] | None = None,
) -> tuple[str, bytes | None, dict[str, str]]:
    """The query, body and content type of a request: a JSON body, or a multipart form
    (``fields`` first, then ``files``: name -> (file name, bytes, content type)).

    :raises RequestBuildError: a JSON body that is not JSON-serialisable.
    """
    query = "?" + urlencode(params) if params else ""
    if files is not None or fields is not None:
        parts: list[tuple[str, Any]] = [*(fields or {}).items(), *(files or {}).items()]
        body, content_type = encode_multipart_formdata(parts)
        return query, body, {"Content-Type": content_type}
    if json_body is None:
        return query, None, {}
    try:
        text = json.dumps(json_body, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RequestBuildError(
            f"request body is not JSON-serialisable ({type(exc).__name__})"
        ) from None
    return query, text.encode("utf-8"), {"Content-Type": "application/json"}


def call_upstream(
    session: UpstreamSession,
    method: str,
    base_url: str,
    path: str,
    timing: tuple[tuple[float, float], float],
    interpret: Interpret,
    **request: Any,
) -> Any:
    """One request within a total deadline; ``interpret`` (status, text, headers) turns
    the answer into ``(error, data)``. Returns the data or raises a typed error.

    Shared by every upstream client (kie.ai, its File Upload API, the legacy relay).
    ``timing`` is ``((connect, read) timeouts, total seconds)``; ``request`` is what
    :func:`encode_request` takes.
    """
    where = base_url + path
    timeout, total = timing
    query, body, headers = encode_request(**request)
    try:
        with deadline(total) as limit:
            # A redirect is never followed: its target would be fetched outside the
            # outbound guard, and its answer quoted in a job's error.
            response = session.request(
                method, where + query, timeout=timeout, body=body, headers=headers
            )
            try:
                if response.status in REDIRECT_STATUSES and "Location" in response.headers:
                    raise redirect_error(response.status)
                content = read_capped(response)
            except BaseException:
                response.close()  # an answer not read to its end closes its connection
                raise
            if content is None:
                response.close()
            else:
                response.release_conn()
    except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
        if limit.expired:
            raise _deadline_error(where, total) from None
        raise error_for_exception(exc, base_url) from None
    if content is None:
        raise oversized_error(response)
    # An answer read in full counts even if the deadline passed meanwhile: for
    # createTask it holds a task id we must not throw away.
    encoding = get_encoding_from_headers(response.headers)
    text = content.decode(_known_encoding(encoding), errors="replace")
    error, data = interpret(response.status, text, response.headers)
    if error is not None and limit.expired:
        raise _deadline_error(where, total)  # cut off by the deadline, not a real answer
    if error is not None:
        raise error
    return data


def _deadline_error(where: str, total: float) -> NetworkError:
    return NetworkError(f"no complete answer from {where} in {total:g}s", ambiguous=True)


class KieClient:
    """Blocking client for createTask, recordInfo and the credit balance.

    Parameters:
        base_url: e.g. ``https://api.kie.ai`` (the sandbox in development).
        api_key: the bearer token; kept in the session headers only.
        connect_timeout, read_timeout: seconds for connecting and for each read.
        request_deadline: seconds for one whole request, answer included.
        secrets: every secret to redact from upstream text (the key is always included).
    """

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 20.0,
        request_deadline: float = 30.0,
        secrets: tuple[str, ...] = (),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._secrets: tuple[str | None, ...] = (api_key.get_secret_value(), *secrets)
        self._timeout = (connect_timeout, read_timeout)
        self._deadline = request_deadline
        self._session = UpstreamSession()
        self._session.headers["Authorization"] = f"Bearer {api_key.get_secret_value()}"
        self._session.headers["Accept"] = "application/json"

    def __repr__(self) -> str:
        return f"KieClient(base_url={self.base_url!r})"

    def close(self) -> None:
        self._session.close()

    def create_task(self, task_input: dict[str, Any], callback_url: str | None = None) -> str:
        """Create one generation task; returns the upstream ``taskId``."""
        payload: dict[str, Any] = {"model": MODEL, "input": task_input}
        if callback_url:
            payload["callBackUrl"] = callback_url
        data = self._call("POST", CREATE_TASK_PATH, json_body=payload)
        task_id = data.get("taskId") if isinstance(data, dict) else None
        if not isinstance(task_id, str | int) or isinstance(task_id, bool) or not str(task_id):
            raise BadAnswerError("createTask answer lacks data.taskId")
        return str(task_id)

    def record_info(self, task_id: str) -> TaskInfo:
        """The current state of an upstream task."""
        return parse_task_info(self._call("GET", RECORD_INFO_PATH, params={"taskId": task_id}))

    def credit(self) -> int:
        """The key's remaining credits."""
        return parse_credit(self._call("GET", CREDIT_PATH))

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return call_upstream(
            self._session,
            method,
            self.base_url,
            path,
            (self._timeout, self._deadline),
            lambda status, text, headers: error_from_response(status, text, headers, self._secrets),
            **kwargs,
        )
