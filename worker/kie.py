"""HTTP client for the kie.ai market API (``ideogram/character-remix``).

One ``requests.Session`` per process with connect/read timeouts. Every answer
is turned into either parsed data or a typed error from :mod:`worker.errors`;
the code may come as the HTTP status or as ``code`` in a 200 body, and both
are handled the same way. The ``Authorization`` header is only ever set on the
session: it is never formatted into a message, and upstream text is redacted.
"""

from __future__ import annotations

import email.utils
import json
import time
from dataclasses import dataclass, field
from typing import Any

import requests
from pydantic import SecretStr

from worker.errors import (
    NetworkError,
    ServerError,
    UnexpectedResponseError,
    UpstreamError,
    error_for_code,
    excerpt,
    redact,
)

MODEL = "ideogram/character-remix"
CREATE_TASK_PATH = "/api/v1/jobs/createTask"
RECORD_INFO_PATH = "/api/v1/jobs/recordInfo"
CREDIT_PATH = "/api/v1/chat/credit"
SUCCESS_CODE = 200

#: Upstream task states that mean "keep polling".
PENDING_STATES = frozenset({"waiting", "queuing", "generating"})
FINAL_STATES = frozenset({"success", "fail"})


@dataclass(frozen=True)
class TaskInfo:
    """What ``recordInfo`` says about one upstream task."""

    task_id: str
    state: str
    result_urls: list[str] = field(default_factory=list)
    fail_code: str | None = None
    fail_msg: str | None = None
    create_time: int | None = None
    complete_time: int | None = None
    cost_time: int | None = None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def parse_result_json(raw: Any) -> list[str]:
    """``resultJson`` is a JSON *string* holding ``{"resultUrls": [...]}``."""
    if not raw:
        return []
    data = json.loads(raw) if isinstance(raw, str) else raw
    urls = data.get("resultUrls") if isinstance(data, dict) else None
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ValueError("resultJson holds no resultUrls list")
    return urls


def _optional_str(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def parse_task_info(data: Any) -> TaskInfo:
    """Parse the ``data`` object of a recordInfo answer or of a callback."""
    if not isinstance(data, dict):
        raise UnexpectedResponseError("bad_response", "recordInfo data is not an object")
    task_id = data.get("taskId") or data.get("task_id")
    state = data.get("state")
    if not task_id or not isinstance(state, str):
        raise UnexpectedResponseError("bad_response", "recordInfo data lacks taskId or state")
    try:
        urls = parse_result_json(data.get("resultJson")) if state == "success" else []
    except ValueError as exc:
        raise UnexpectedResponseError("bad_response", f"resultJson: {exc}") from exc
    return TaskInfo(
        task_id=str(task_id),
        state=state,
        result_urls=urls,
        fail_code=_optional_str(data.get("failCode")),
        fail_msg=_optional_str(data.get("failMsg")),
        create_time=data.get("createTime"),
        complete_time=data.get("completeTime"),
        cost_time=data.get("costTime"),
    )


def error_from_response(
    status: int, body_text: str, headers: Any, secrets: tuple[str | None, ...] = ()
) -> tuple[UpstreamError | None, Any]:
    """Interpret one HTTP answer: ``(error, None)`` or ``(None, data)``.

    Pure function of the response parts, so it is unit-tested with plain data.
    """
    retry_after = parse_retry_after(headers.get("Retry-After") if headers else None)
    try:
        body = json.loads(body_text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        # A proxy's HTML error page or other non-JSON answer: treat as a 5xx.
        status_code = status if status >= 500 else 502
        message = redact(f"non-JSON answer (HTTP {status}): {excerpt(body_text)}", secrets)
        return ServerError(message, retry_after=retry_after, status=status_code), None
    body_code = body.get("code")
    code = body_code if isinstance(body_code, int) and not isinstance(body_code, bool) else None
    if status != SUCCESS_CODE and code in (None, SUCCESS_CODE):
        code = status
    if code is None:
        code = SUCCESS_CODE
    if code != SUCCESS_CODE:
        message = redact(str(body.get("msg") or body.get("message") or ""), secrets)
        return error_for_code(code, message, retry_after=retry_after), None
    return None, body.get("data")


class KieClient:
    """Blocking client for createTask, recordInfo and the credit balance.

    Parameters:
        base_url: e.g. ``https://api.kie.ai`` (the sandbox in development).
        api_key: the bearer token; kept in the session headers only.
        connect_timeout, read_timeout: seconds for each request.
    """

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 20.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._secrets: tuple[str | None, ...] = (api_key.get_secret_value(),)
        self._timeout = (connect_timeout, read_timeout)
        self._session = requests.Session()
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
        data = self._call("POST", CREATE_TASK_PATH, json=payload)
        task_id = data.get("taskId") if isinstance(data, dict) else None
        if not task_id:
            raise UnexpectedResponseError("bad_response", "createTask answer lacks data.taskId")
        return str(task_id)

    def record_info(self, task_id: str) -> TaskInfo:
        """The current state of an upstream task."""
        return parse_task_info(self._call("GET", RECORD_INFO_PATH, params={"taskId": task_id}))

    def credit(self) -> int:
        """The key's remaining credits."""
        data = self._call("GET", CREDIT_PATH)
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise UnexpectedResponseError("bad_response", "credit answer is not a number")
        return int(data)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._session.request(
                method, self.base_url + path, timeout=self._timeout, **kwargs
            )
        except requests.ConnectTimeout:
            raise NetworkError(f"connect timeout to {self.base_url}") from None
        except requests.ReadTimeout:
            raise NetworkError(
                f"no answer from {self.base_url}{path} within {self._timeout[1]:g}s"
            ) from None
        except requests.ConnectionError as exc:
            raise NetworkError(
                f"connection to {self.base_url} failed ({type(exc).__name__})"
            ) from None
        error, data = error_from_response(
            response.status_code, response.text, response.headers, self._secrets
        )
        if error is not None:
            raise error
        return data
