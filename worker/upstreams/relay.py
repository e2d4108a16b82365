"""HTTP client for the legacy remix relay (provider ``ideogram-remix``).

The relay takes ``POST /ideogram/remix`` as a multipart body: ``image_request`` (the
request as JSON text, plain UTF-8) and ``image_file`` (the source image's bytes). It
answers in one of two ways: synchronously, generation done inside the request
(``{"created", "data": [{"url"}]}``), or with an envelope naming a task to poll
(``{"code": 0, "message": "SUCCEED", "data": {"task_id", "task_status"}}``). Here
``code`` 0 means success, unlike kie.ai's 200, so the relay has its own mapping of
answers onto the typed errors of :mod:`worker.upstreams.errors` (:func:`relay_error_from_response`).

The relay documents no status endpoint. Its path and its state names are settings
(``IDEOGRAM_STATUS_PATH``, ``IDEOGRAM_STATE_MAP``); result URLs are read from
``data.task_result.images[].url``, ``data.data[].url`` or ``data.result_urls``, the
failure reason from ``data.task_status_msg``. A status answer becomes the same
:class:`worker.upstreams.kie.TaskInfo` as kie.ai's, so the poll policy needs no branch.

As in :mod:`worker.upstreams.kie`: the bearer header lives on the session only, upstream text is
redacted before it is shortened, transport exceptions become messages of our own, an
answer is read up to :data:`worker.upstreams.kie.MAX_ANSWER_BYTES` only, and every request has a
total deadline (a longer one for the remix request, which generates).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from pydantic import SecretStr

from worker.fields import BlobRef
from worker.net.deadline import UpstreamSession
from worker.redaction import redactor_for
from worker.upstreams.errors import (
    BadAnswerError,
    MaintenanceError,
    NotFoundError,
    RateLimitedError,
    UpstreamError,
    error_for_code,
    excerpt,
)
from worker.upstreams.kie import (
    TaskInfo,
    _read_code,
    call_upstream,
    non_json_error,
    parse_retry_after,
)

REMIX_PATH = "/ideogram/remix"
OK = 200
#: The envelope's ``code`` of success.
SUCCESS_CODE = 0
#: Codes in a 200 envelope that say the request was refused, not acted on.
REFUSAL_CODES = {429: RateLimitedError, 455: MaintenanceError}
#: The task id a pause's probe asks about (it never exists).
PROBE_TASK_ID = "remixq-probe"
#: Where a status answer may hold the result URLs, in the order they are looked for.
RESULT_PLACES = ("task_result.images", "data", "result_urls")


@dataclass(frozen=True)
class RemixAnswer:
    """What a remix request answered: the images at once, or a task to poll."""

    result_urls: list[str] = field(default_factory=list)
    task_id: str | None = None


def _message(body: dict[str, Any]) -> str:
    for name in ("message", "msg", "error", "detail"):
        value = body.get(name)
        if value:
            return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return ""


def relay_error_from_response(
    status: int, text: str, headers: Any, secrets: tuple[str | None, ...] = ()
) -> tuple[UpstreamError | None, Any]:
    """Interpret one HTTP answer of the relay: ``(error, None)`` or ``(None, body)``.

    Pure function of the response parts (unit-tested with plain data). The HTTP status
    decides when it is not 200; in a 200 answer a ``code`` other than 0 is an error:
    429 and 455 are refusals, any other may hide work done, so it is ambiguous.
    """
    redactor = redactor_for(secrets)
    retry_after = parse_retry_after(headers.get("Retry-After") if headers else None)
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        return non_json_error(status, redactor.redact(text), retry_after), None
    message = excerpt(redactor.redact(_message(body)))
    if status != OK:
        return error_for_code(status, message, retry_after=retry_after), None
    if "code" not in body:
        return None, body
    code = _read_code(body.get("code"))
    if code == SUCCESS_CODE:
        return None, body
    refusal = REFUSAL_CODES.get(code) if code is not None else None
    if refusal is not None:
        return refusal(message, retry_after=retry_after), None
    shown = excerpt(str(body.get("code")), 20)
    return BadAnswerError(f"relay answered code {shown}: {message}"), None


def _urls_of(items: Any) -> list[str]:
    """The ``url`` of each object of a list (or the strings of a list of strings)."""
    if not isinstance(items, list):
        return []
    urls = [item.get("url") if isinstance(item, dict) else item for item in items]
    return [url for url in urls if isinstance(url, str) and url]


def parse_remix_answer(body: Any) -> RemixAnswer:
    """A remix answer: images (the synchronous form) or a task id (the envelope)."""
    if not isinstance(body, dict):
        raise BadAnswerError("relay answer is not a JSON object")
    data = body.get("data")
    if isinstance(data, list):
        urls = _urls_of(data)
        if not urls:
            raise BadAnswerError("relay answer holds no image URLs")
        return RemixAnswer(result_urls=urls)
    task_id = data.get("task_id") if isinstance(data, dict) else None
    if isinstance(task_id, bool) or not isinstance(task_id, str | int) or not str(task_id):
        raise BadAnswerError("relay answer lacks data.task_id and image URLs")
    return RemixAnswer(task_id=str(task_id))


def _dig(data: dict[str, Any], place: str) -> Any:
    value: Any = data
    for part in place.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def parse_status(body: Any, task_id: str, state_map: dict[str, str]) -> TaskInfo:
    """A status answer's envelope as a :class:`TaskInfo` (states mapped to the poll's)."""
    data = body.get("data") if isinstance(body, dict) else None
    status = data.get("task_status") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(status, str):
        raise BadAnswerError("relay status answer lacks data.task_status")
    state = state_map.get(status.lower(), status)
    urls: list[str] = []
    if state == "success":
        urls = next((u for p in RESULT_PLACES if (u := _urls_of(_dig(data, p)))), [])
        if not urls:
            raise BadAnswerError("relay status says success without result URLs")
    reason = data.get("task_status_msg")
    return TaskInfo(
        task_id=str(data.get("task_id") or task_id),
        state=state,
        result_urls=urls,
        fail_msg=reason if isinstance(reason, str) and reason else None,
    )


class IdeogramClient:
    """Blocking client for the relay's remix request and its (assumed) status endpoint.

    Parameters:
        base_url: ``IDEOGRAM_BASE_URL`` (the sandbox in development).
        api_key: the bearer token; kept in the session headers only.
        status_path: ``IDEOGRAM_STATUS_PATH``, holding ``{task_id}``.
        state_map: relay state -> poll state (:func:`worker.settings.parse_state_map`).
        connect_timeout, read_timeout, request_deadline: of the remix request, which
            generates the images when the relay answers synchronously.
        status_read_timeout, status_deadline: of a status request.
        secrets: every secret to redact from upstream text (the key is always included).
    """

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr,
        *,
        status_path: str = "/ideogram/remix/{task_id}",
        state_map: dict[str, str] | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 180.0,
        request_deadline: float = 200.0,
        status_read_timeout: float = 20.0,
        status_deadline: float = 30.0,
        secrets: tuple[str, ...] = (),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._status_path = status_path
        self._state_map = state_map or {}
        self._secrets: tuple[str | None, ...] = (api_key.get_secret_value(), *secrets)
        self._remix_timing = ((connect_timeout, read_timeout), request_deadline)
        self._status_timing = ((connect_timeout, status_read_timeout), status_deadline)
        self._session = UpstreamSession()
        self._session.headers["Authorization"] = f"Bearer {api_key.get_secret_value()}"
        self._session.headers["Accept"] = "application/json"

    def __repr__(self) -> str:
        return f"IdeogramClient(base_url={self.base_url!r})"

    def close(self) -> None:
        self._session.close()

    def remix(self, image_request: dict[str, Any], image: bytes, ref: BlobRef) -> RemixAnswer:
        """Send one remix request: the images, or the relay's task id."""
        text = json.dumps(image_request, ensure_ascii=False).encode()
        files = {
            "image_request": (None, text, "application/json; charset=utf-8"),
            "image_file": (ref.name, image, ref.content_type),
        }
        body = self._call("POST", REMIX_PATH, self._remix_timing, files=files)
        return parse_remix_answer(body)

    def record_info(self, task_id: str) -> TaskInfo:
        """The current state of a relay task, as the poll policy reads it."""
        path = self._status_path.replace("{task_id}", quote(task_id, safe=""))
        body = self._call("GET", path, self._status_timing)
        return parse_status(body, task_id, self._state_map)

    def credit(self) -> int:
        """Whether the relay answers again, for the probe that may end a pause.

        The relay has no balance endpoint, so this asks for the status of a task that
        does not exist: "not found" means the relay is up (1 credit, nominally); a 455 or
        a 5xx raises, as kie.ai's credit endpoint would.
        """
        # Not found, or an answer that is not a status: either way the relay is up.
        with contextlib.suppress(NotFoundError, BadAnswerError):
            self.record_info(PROBE_TASK_ID)
        return 1

    def _call(
        self, method: str, path: str, timing: tuple[tuple[float, float], float], **kwargs: Any
    ) -> Any:
        return call_upstream(
            self._session,
            method,
            self.base_url,
            path,
            timing,
            lambda status, text, headers: relay_error_from_response(
                status, text, headers, self._secrets
            ),
            **kwargs,
        )
