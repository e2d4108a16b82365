"""The sandbox's endpoints as plain functions from a request to a reply, sharing one lock."""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import math
import random
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from sandbox.callbacks import Callback, Outcome
from sandbox.config import Endpoint, FaultStyle, SandboxConfig, describe_error
from sandbox.images import render_png
from sandbox.multipart import MultipartError, Part, parse_form
from sandbox.pages import TOO_MANY_REQUESTS, html_page, is_html_page, text_page
from sandbox.relay import (
    RELAY_MODEL,
    REMIX_PATH,
    STATUS_PATH,
    RelayRequest,
    peek_relay_prompt,
    read_relay_request,
    sync_answer,
    task_envelope,
)
from sandbox.state import FAIL, FAIL_MSG, SUCCESS, SlidingWindow, Stats, Task
from sandbox.validation import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NUM_IMAGES,
    Directives,
    RequestError,
    parse_directives,
    peek_prompt,
    validate_create_body,
)
from worker.images import sniff_image_type

CREATE_PATH = "/api/v1/jobs/createTask"
RECORD_PATH = "/api/v1/jobs/recordInfo"
CREDIT_PATH = "/api/v1/chat/credit"
CONFIG_PATH = "/_sandbox/config"
STATS_PATH = "/_sandbox/stats"
RESET_PATH = "/_sandbox/reset"
HEALTH_PATH = "/healthz"
FILE_PATH = re.compile(r"/files/(?P<task_id>[^/]+)/(?P<index>\d+)\.png")
UPLOAD_PATH = "/api/file-stream-upload"
UPLOADED_PATH = re.compile(r"/uploads/(?P<upload_id>[0-9a-f]+)/(?P<name>[^/]+)")

JSON_TYPE = "application/json"
HTML_TYPE = "text/html; charset=utf-8"
PNG_TYPE = "image/png"
TEXT_TYPE = "text/plain; charset=utf-8"
OK = 200
BAD_REQUEST = 400
NOT_FOUND = 404
INTERNAL_ERROR = 500
BAD_GATEWAY = 502
UNLIMITED_CREDITS = 999999
TASK_ID_RANDOM_BYTES = 4
RETRY_AFTER = "Retry-After"
MIXED_STYLES: tuple[FaultStyle, ...] = ("http", "body", "page")
CODE_MESSAGES: dict[int, str] = {
    401: "Unauthorized: authentication credentials are missing or invalid",
    402: "Insufficient credits",
    404: "Not found",
    422: "Validation error",
    429: "Rate limited: too many requests",
    455: "Service unavailable: the system is under maintenance",
    500: "Server error",
    501: "Generation failed",
    505: "Feature disabled",
}


@dataclass(frozen=True)
class Request:
    """What the endpoints need of an HTTP request.

    :param method: ``GET`` or ``POST``.
    :param path: the URL path without the query.
    :param query: the parsed query string.
    :param authorization: the ``Authorization`` header, if sent.
    :param body: the raw body.
    :param content_type: the ``Content-Type`` header, if sent.
    """

    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str | None
    body: bytes
    #: The ``Content-Type`` header (multipart requests carry their boundary in it).
    content_type: str | None = None


@dataclass(frozen=True)
class Reply:
    """What to answer.

    :param status: the HTTP status.
    :param body: the body bytes.
    :param content_type: the ``Content-Type`` header.
    :param headers: further headers.
    :param code: the code counted in the stats (the body's ``code``, or the HTTP status).
    :param delay: seconds to wait before answering.
    :param reset: reset the connection instead of answering.
    :param cut: send the headers with the full ``Content-Length``, then only the first half
        of the body, then close the connection.
    :param trickle: seconds to wait before each byte of the body (0: the body at once).
    :param created: the task this answer reports as created (createTask), for the stats.
    """

    status: int
    body: bytes = b""
    content_type: str = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()
    code: int | None = None
    delay: float = 0.0
    reset: bool = False
    cut: bool = False
    trickle: float = 0.0
    created: Task | None = None


RESET = Reply(status=0, reset=True)
HTML_ERROR = Reply(BAD_GATEWAY, html_page(BAD_GATEWAY), HTML_TYPE, code=BAD_GATEWAY)
GATEWAY_TIMEOUT = 504
GATEWAY_TIMEOUT_PAGE = Reply(
    GATEWAY_TIMEOUT, html_page(GATEWAY_TIMEOUT), HTML_TYPE, code=GATEWAY_TIMEOUT
)
HEALTHY = Reply(OK, b"ok", TEXT_TYPE, code=OK)


def json_reply(
    status: int, payload: Any, code: int | None = None, headers: tuple[tuple[str, str], ...] = ()
) -> Reply:
    """A JSON reply.

    :param status: the HTTP status.
    :param payload: anything ``json.dumps`` takes.
    :param code: the code counted in the stats; the HTTP status when None.
    :param headers: further headers.
    """
    body = json.dumps(payload, ensure_ascii=False).encode()
    return Reply(status, body, JSON_TYPE, headers, status if code is None else code)


def page_reply(status: int, msg: str, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    """A non-JSON error: an HTML page for 5xx and 429, a line of plain text otherwise.

    :param status: the HTTP status, also the code counted in the stats.
    :param msg: the error message (only the text form shows it).
    :param headers: further headers.
    """
    if is_html_page(status):
        return Reply(status, html_page(status), HTML_TYPE, headers, status)
    return Reply(status, text_page(status, msg), TEXT_TYPE, headers, status)


def _parse_json(body: bytes) -> tuple[bool, Any]:
    """``(True, value)`` for a body holding JSON, ``(False, None)`` otherwise."""
    try:
        return True, json.loads(body)
    except ValueError:
        return False, None


def _envelope(data: Any) -> dict[str, Any]:
    """The success envelope kie.ai wraps every answer's ``data`` in."""
    return {"code": OK, "msg": "success", "data": data}


def _success(data: Any) -> Reply:
    return json_reply(OK, _envelope(data))


def _form_text(form: dict[str, list[Part]], name: str) -> str:
    parts = form.get(name) or []
    return parts[0].data.decode("utf-8", "replace") if parts else ""


def _count(counter: Counter[int], reply: Reply) -> None:
    """Count the reply's code (resets have none)."""
    if reply.code is not None:
        counter[reply.code] += 1


class SandboxApi:
    """Endpoint logic and all mutable state (config, tasks, counters, RNG) behind one lock."""

    def __init__(self, config: SandboxConfig) -> None:
        """:param config: the starting settings; the sandbox keeps its own copy."""
        self._lock = threading.Lock()
        self._config = config.model_copy(deep=True)
        self._rng = random.Random(config.seed)
        self._tasks: dict[str, Task] = {}
        self._stats = Stats()
        self._window = SlidingWindow()
        self._callbacks_due: list[tuple[float, str]] = []
        #: Uploaded files by id: ``(file name, bytes, content type)``.
        self._uploads: dict[str, tuple[str, bytes, str]] = {}
        self.base_url = ""
        self._routes: dict[tuple[str, str], Callable[[Request], Reply]] = {
            ("POST", CREATE_PATH): self._create_task,
            ("GET", RECORD_PATH): self._record_info,
            ("GET", CREDIT_PATH): self._credit,
            ("POST", UPLOAD_PATH): self._upload,
            ("GET", CONFIG_PATH): lambda _request: json_reply(OK, self.config_json()),
            ("POST", CONFIG_PATH): self._configure,
            ("GET", STATS_PATH): lambda _request: json_reply(OK, self.stats()),
            ("POST", RESET_PATH): self._reset,
            ("GET", HEALTH_PATH): lambda _request: HEALTHY,
            ("POST", REMIX_PATH): self._relay_remix,
        }

    @property
    def config(self) -> SandboxConfig:
        """A copy of the current settings."""
        with self._lock:
            return self._config.model_copy(deep=True)

    def config_json(self) -> dict[str, Any]:
        """The current settings as JSON-ready data."""
        with self._lock:
            return self._config.model_dump(mode="json")

    def configure(self, patch: dict[str, Any]) -> SandboxConfig:
        """Merge ``patch`` into the settings; a new ``seed`` restarts the RNG.

        :param patch: field name to new value.
        :raises pydantic.ValidationError: when the result is invalid (nothing changes).
        """
        with self._lock:
            self._config = self._config.apply(patch)
            if "seed" in patch:
                self._rng.seed(self._config.seed)
            return self._config.model_copy(deep=True)

    def stats(self) -> dict[str, Any]:
        """The counters, as served at ``/_sandbox/stats``."""
        with self._lock:
            return self._stats.as_json(tasks=len(self._tasks))

    def reset(self) -> None:
        """Forget every task, pending callback, rate-limit entry and counter (not the settings)."""
        with self._lock:
            self._tasks.clear()
            self._callbacks_due.clear()
            self._uploads.clear()
            self._window.clear()
            self._stats = Stats()

    def handle(self, request: Request) -> Reply:
        """Answer one request.

        :param request: the parsed HTTP request.
        """
        route = self._routes.get((request.method, request.path))
        if route is not None:
            return route(request)
        file_match = FILE_PATH.fullmatch(request.path)
        if request.method == "GET" and file_match is not None:
            return self._file(file_match)
        status_match = STATUS_PATH.fullmatch(request.path)
        if request.method == "GET" and status_match is not None:
            return self._relay_status(request, status_match.group("task_id"))
        uploaded_match = UPLOADED_PATH.fullmatch(request.path)
        if request.method == "GET" and uploaded_match is not None:
            return self._uploaded(uploaded_match)
        return json_reply(NOT_FOUND, {"code": NOT_FOUND, "msg": "not found"})

    def due_callbacks(self, now: float) -> list[Callback]:
        """Callbacks of tasks final by ``now``, each handed out once.

        :param now: unix time.
        """
        due: list[Callback] = []
        with self._lock:
            while self._callbacks_due and self._callbacks_due[0][0] <= now:
                _, task_id = heapq.heappop(self._callbacks_due)
                task = self._tasks.get(task_id)
                if task is not None and task.callback_url is not None:
                    payload = json.dumps(_envelope(task.record(now, self.base_url)))
                    key = self._config.webhook_hmac_key
                    due.append(Callback(task_id, task.callback_url, payload.encode(), key))
        return due

    def note_callback(self, outcome: Outcome) -> None:
        """Count one finished callback delivery.

        :param outcome: ``sent`` (answered 2xx), ``failed`` (after the retry) or ``refused``.
        """
        with self._lock:
            if outcome == "sent":
                self._stats.callbacks_sent += 1
            elif outcome == "failed":
                self._stats.callbacks_failed += 1
            else:
                self._stats.callbacks_refused += 1

    def _create_task(self, request: Request) -> Reply:
        parsed, body = _parse_json(request.body)
        with self._lock:
            self._stats.create_requests += 1
            prompt = peek_prompt(body)
            if prompt is not None:
                self._stats.create_requests_by_prompt[prompt] += 1
            reply = self._guarded("createTask", request, lambda: self._create(parsed, body))
            _count(self._stats.create_by_code, reply)
        return reply

    def _record_info(self, request: Request) -> Reply:
        with self._lock:
            self._stats.record_requests += 1
            reply = self._guarded("recordInfo", request, lambda: self._lookup(request))
            _count(self._stats.record_by_code, reply)
        return reply

    def _credit(self, request: Request) -> Reply:
        with self._lock:
            credits = self._config.credits
            balance = UNLIMITED_CREDITS if credits is None else credits
            return self._maintenance_error() or self._auth_error(request) or _success(balance)

    def _upload(self, request: Request) -> Reply:
        with self._lock:
            self._stats.upload_requests += 1
            reply = self._guarded("upload", request, lambda: self._store_upload(request))
            _count(self._stats.upload_by_code, reply)
        return reply

    def _store_upload(self, request: Request) -> Reply:
        """The File Upload API: a multipart ``file``, ``uploadPath`` and ``fileName``."""
        try:
            form = parse_form(request.content_type, request.body)
        except MultipartError as exc:
            return self._error(422, str(exc))
        files = form.get("file") or []
        if len(files) != 1 or not files[0].data:
            return self._error(422, "exactly one non-empty file part is required")
        content_type = sniff_image_type(files[0].data)
        if content_type is None:
            return self._error(422, "file is not a JPEG, PNG or WebP image")
        names = form.get("fileName") or []
        name = names[0].data.decode("utf-8", "replace") if names else files[0].filename or ""
        name = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "upload"
        upload_id = secrets.token_hex(8)
        self._uploads[upload_id] = (name, files[0].data, content_type)
        self._stats.uploaded_sha256.append(hashlib.sha256(files[0].data).hexdigest())
        url = f"{self.base_url}/uploads/{upload_id}/{name}"
        return _success(
            {
                "fileName": name,
                "filePath": f"{_form_text(form, 'uploadPath')}/{name}",
                "downloadUrl": url,
                "fileSize": len(files[0].data),
                "mimeType": content_type,
                "uploadedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )

    def _uploaded(self, match: re.Match[str]) -> Reply:
        with self._lock:
            found = self._uploads.get(match.group("upload_id"))
        if found is None or found[0] != match.group("name"):
            return json_reply(NOT_FOUND, {"code": NOT_FOUND, "msg": "file not found"})
        return Reply(OK, found[1], found[2])

    def _configure(self, request: Request) -> Reply:
        parsed, patch = _parse_json(request.body)
        if not parsed or not isinstance(patch, dict):
            return json_reply(
                BAD_REQUEST, {"code": BAD_REQUEST, "msg": "body must be a JSON object"}
            )
        try:
            self.configure(patch)
        except ValidationError as exc:
            return json_reply(BAD_REQUEST, {"code": BAD_REQUEST, "msg": describe_error(exc)})
        return json_reply(OK, self.config_json())

    def _reset(self, _request: Request) -> Reply:
        self.reset()
        return json_reply(OK, {"code": OK, "msg": "success"})

    def _file(self, match: re.Match[str]) -> Reply:
        index = int(match.group("index"))
        with self._lock:
            task = self._tasks.get(match.group("task_id"))
        if task is None or task.state_at(time.time())[0] != SUCCESS or index >= task.num_images:
            return json_reply(NOT_FOUND, {"code": NOT_FOUND, "msg": "file not found"})
        return Reply(OK, render_png(task.task_id, index, task.prompt, task.image_size), PNG_TYPE)

    def _guarded(
        self,
        endpoint: Endpoint,
        request: Request,
        answer: Callable[[], Reply],
        api_key: str | None = None,
    ) -> Reply:
        """Injected faults and maintenance first, then authentication, then ``answer``.

        The answer found may then be dropped, replaced by a gateway's timeout page, cut or
        trickled. Random draws, each made only when its rate is above 0: reset, HTML page,
        slow, fault code, mixed style, drop, gateway, cut, trickle.
        """
        transport_fault = self._transport_fault(endpoint)
        if transport_fault is not None:
            return transport_fault
        delay = self._slow_delay(endpoint)
        reply = (
            self._maintenance_error()
            or self._injected_fault(endpoint)
            or self._auth_error(request, api_key)
            or answer()
        )
        reply = self._delivery_fault(endpoint, reply)
        return replace(reply, delay=delay) if delay else reply

    def _transport_fault(self, endpoint: Endpoint) -> Reply | None:
        """A connection reset or a gateway's HTML error page, drawn at random."""
        config = self._config
        if endpoint not in config.fault_endpoints:
            return None
        if self._draw(config.reset_rate):
            self._stats.resets += 1
            return RESET
        if self._draw(config.html_rate):
            self._stats.html_errors += 1
            return HTML_ERROR
        return None

    def _delivery_fault(self, endpoint: Endpoint, reply: Reply) -> Reply:
        """``reply`` dropped or replaced by a gateway's 504 page (a created task's answer
        only), or cut and/or trickled, at random.

        A created task whose answer is dropped, replaced or cut is counted as ambiguous: the
        client cannot know it was created.
        """
        config = self._config
        if reply.created is not None and self._draw(config.drop_rate):
            self._stats.dropped += 1
            self._count_ambiguous(reply.created)
            return RESET
        if reply.created is not None and self._draw(config.gateway_rate):
            self._stats.gateway_timeouts += 1
            self._count_ambiguous(reply.created)
            return GATEWAY_TIMEOUT_PAGE
        if endpoint not in config.fault_endpoints:
            return reply
        cut = self._draw(config.cut_rate)
        trickle = self._draw(config.trickle_rate)
        if cut:
            self._stats.cut_bodies += 1
            if reply.created is not None:
                self._count_ambiguous(reply.created)
        if trickle:
            self._stats.trickled += 1
        return replace(reply, cut=cut, trickle=config.trickle_seconds if trickle else 0.0)

    def _count_ambiguous(self, task: Task) -> None:
        self._stats.ambiguous += 1
        self._stats.ambiguous_by_prompt[task.prompt] += 1

    def _slow_delay(self, endpoint: Endpoint) -> float:
        config = self._config
        if endpoint not in config.fault_endpoints or not self._draw(config.slow_rate):
            return 0.0
        self._stats.slow_answers += 1
        return config.slow_seconds

    def _maintenance_error(self) -> Reply | None:
        return self._error(455) if self._config.maintenance else None

    def _injected_fault(self, endpoint: Endpoint) -> Reply | None:
        """A configured fault code, each drawn with its own probability (they add up)."""
        faults = self._config.faults
        if endpoint not in self._config.fault_endpoints or not any(faults.values()):
            return None
        roll, threshold = self._rng.random(), 0.0
        for code, probability in sorted(faults.items()):
            threshold += probability
            if roll < threshold:
                return self._error(code)
        return None

    def _auth_error(self, request: Request, api_key: str | None = None) -> Reply | None:
        scheme, _, token = (request.authorization or "").partition(" ")
        expected = (api_key or self._config.api_key).encode()
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected):
            return None
        self._stats.auth_headers_seen_invalid += 1
        return self._error(401)

    def _create(self, parsed: bool, body: Any) -> Reply:
        """Validation, directives, credits and the rate limit; then the task is created."""
        if not parsed:
            return self._error(422, "request body is not valid JSON")
        try:
            task_input = validate_create_body(body)
            directives = parse_directives(task_input["prompt"])
        except RequestError as exc:
            return self._error(422, str(exc))
        now = time.time()
        refused = self._refused(directives) or self._rate_limited(now)
        return refused or self._accept(body, task_input, directives, now)

    def _refused(self, directives: Directives) -> Reply | None:
        """The code a prompt's directive asks for, or 402 when the credits are spent."""
        if directives.create_code is not None:
            return self._error(directives.create_code)
        credits = self._config.credits
        if credits is not None and credits <= 0:
            return self._error(402)
        return None

    def _rate_limited(self, now: float, api_key: str | None = None) -> Reply | None:
        """A 429 when the key's window is full; the request is dropped."""
        config = self._config
        window = config.rate_limit_window
        if window is None:
            return None
        wait = self._window.wait_time(api_key or config.api_key, window[0], window[1], now)
        if wait <= 0:
            return None
        self._stats.rate_limited += 1
        headers = ((RETRY_AFTER, str(max(1, math.ceil(wait)))),)
        return self._error(429, headers=headers if config.retry_after_header else ())

    def _accept(
        self, body: dict[str, Any], task_input: dict[str, Any], directives: Directives, now: float
    ) -> Reply:
        config = self._config
        task = Task(
            task_id=self._new_task_id(now),
            model=body["model"],
            param=json.dumps(body, ensure_ascii=False),
            prompt=task_input["prompt"],
            num_images=int(task_input.get("num_images", DEFAULT_NUM_IMAGES)),
            image_size=task_input.get("image_size", DEFAULT_IMAGE_SIZE),
            callback_url=body.get("callBackUrl"),
            created_at=now,
            duration=config.generation_seconds
            if directives.seconds is None
            else directives.seconds,
            fails=directives.fail,
        )
        self._tasks[task.task_id] = task
        self._window.record(config.api_key, now)
        if config.credits is not None:
            config.credits -= 1
        if task.callback_url is not None:
            heapq.heappush(self._callbacks_due, (task.finished_at, task.task_id))
        self._stats.create_accepted += 1
        self._stats.accepted_at.append(now)
        self._stats.accepted_by_prompt[task.prompt] += 1
        return replace(_success({"taskId": task.task_id}), created=task)

    def _lookup(self, request: Request) -> Reply:
        task_id = (request.query.get("taskId") or [""])[0]
        if not task_id:
            return self._error(422, "taskId is required")
        task = self._tasks.get(task_id)
        if task is None:
            return self._error(404, f"task {task_id} not found")
        return _success(task.record(time.time(), self.base_url))

    # ------------------------------------------------------------ the legacy remix relay

    def _relay_key(self) -> str:
        return self._config.relay_api_key or self._config.api_key

    def _relay_remix(self, request: Request) -> Reply:
        prompt = peek_relay_prompt(request.content_type, request.body)
        with self._lock:
            self._stats.relay_requests += 1
            if prompt is not None:
                self._stats.relay_requests_by_prompt[prompt] += 1
            answer = lambda: self._relay_create(request)  # noqa: E731
            reply = self._guarded("remix", request, answer, self._relay_key())
            _count(self._stats.relay_by_code, reply)
        return reply

    def _relay_create(self, request: Request) -> Reply:
        """The relay's checks, directives, credits and rate limit; then the images or a task."""
        try:
            relay = read_relay_request(request.content_type, request.body)
            directives = parse_directives(relay.prompt)
        except RequestError as exc:
            return json_reply(BAD_REQUEST, {"code": BAD_REQUEST, "message": str(exc)})
        now = time.time()
        refused = self._refused(directives) or self._rate_limited(now, self._relay_key())
        return refused or self._relay_accept(relay, directives, now)

    def _relay_accept(self, relay: RelayRequest, directives: Directives, now: float) -> Reply:
        config = self._config
        sync = config.relay_mode == "sync"
        seconds = config.generation_seconds if directives.seconds is None else directives.seconds
        task = Task(
            task_id=self._new_task_id(now),
            model=RELAY_MODEL,
            param=json.dumps(relay.image_request, ensure_ascii=False),
            prompt=relay.prompt,
            num_images=relay.num_images,
            image_size=DEFAULT_IMAGE_SIZE,
            callback_url=None,
            created_at=now + seconds if sync else now,
            duration=0.0 if sync else seconds,
            fails=directives.fail,
        )
        self._tasks[task.task_id] = task
        self._window.record(self._relay_key(), now)
        if config.credits is not None:
            config.credits -= 1
        self._stats.relay_accepted += 1
        self._stats.relay_accepted_by_prompt[task.prompt] += 1
        self._stats.relay_last_request = {
            "image_request": relay.image_request,
            "image_type": relay.image_type,
            "image_bytes": len(relay.image),
        }
        if not sync:
            envelope = task_envelope(task.task_id, config.relay_state_names["waiting"])
            return replace(json_reply(OK, envelope), created=task)
        if task.fails:
            return replace(self._error(500, FAIL_MSG), created=task, delay=seconds)
        answer = sync_answer(task.result_urls(self.base_url), relay, self._rng.randrange(2**31))
        return replace(json_reply(OK, answer), created=task, delay=seconds)

    def _relay_status(self, request: Request, task_id: str) -> Reply:
        with self._lock:
            self._stats.relay_status_requests += 1
            answer = lambda: self._relay_lookup(task_id)  # noqa: E731
            return self._guarded("remixStatus", request, answer, self._relay_key())

    def _relay_lookup(self, task_id: str) -> Reply:
        task = self._tasks.get(task_id)
        if task is None or task.model != RELAY_MODEL:
            return json_reply(
                NOT_FOUND, {"code": NOT_FOUND, "message": f"task {task_id} not found"}
            )
        state, _ = task.state_at(time.time())
        extra: dict[str, Any] = {}
        if state == SUCCESS:
            images = [{"url": url} for url in task.result_urls(self.base_url)]
            extra["task_result"] = {"images": images}
        elif state == FAIL:
            extra["task_status_msg"] = FAIL_MSG
        names = self._config.relay_state_names
        return json_reply(OK, task_envelope(task_id, names.get(state, state), extra))

    def _new_task_id(self, now: float) -> str:
        while True:
            suffix = secrets.token_hex(TASK_ID_RANDOM_BYTES)
            task_id = f"task_ideogram_{int(now * 1000)}_{suffix}"
            if task_id not in self._tasks:
                return task_id

    def _draw(self, probability: float) -> bool:
        """True with ``probability``; no RNG draw when it is 0, so seeded runs stay aligned."""
        return probability > 0 and self._rng.random() < probability

    def _error(
        self, code: int, msg: str | None = None, headers: tuple[tuple[str, str], ...] = ()
    ) -> Reply:
        """An error answer in the configured fault style, counted as ``code`` in the stats.

        ``http``: JSON ``{"code", "msg"}`` with the HTTP status ``code``; ``body``: the same
        JSON with HTTP 200; ``page``: HTTP status ``code`` with an HTML or text page;
        ``mixed``: one of these three, drawn at random.

        :param code: the error code.
        :param msg: the message; the code's usual one when None.
        :param headers: further headers (a 429's ``Retry-After`` may be replaced).
        """
        style = self._config.fault_style
        if style == "mixed":
            style = self._rng.choice(MIXED_STYLES)
        text = msg or CODE_MESSAGES[code]
        headers = self._retry_after(code, headers)
        if style == "page":
            return page_reply(code, text, headers)
        status = code if style == "http" else OK
        return json_reply(status, {"code": code, "msg": text}, code=code, headers=headers)

    def _retry_after(
        self, code: int, headers: tuple[tuple[str, str], ...]
    ) -> tuple[tuple[str, str], ...]:
        """``headers``, with the configured ``retry_after`` as the header of a 429."""
        value = self._config.retry_after
        if code != TOO_MANY_REQUESTS or value is None:
            return headers
        others = tuple((name, text) for name, text in headers if name != RETRY_AFTER)
        return (*others, (RETRY_AFTER, value))
