"""Upstream callbacks: check that kie.ai sent one, then finish its job like a poll would.

kie.ai signs a callback with ``X-Webhook-Signature`` = base64(HMAC-SHA256(key,
``taskId + "." + X-Webhook-Timestamp``)). The signature covers neither the body nor our
``job_id`` query parameter, so only the task id and the timestamp are trusted:

* the task id must already belong to a job (the index written when a task is accepted),
  and then the body's final state finishes that job through the poller's own transition
  (:func:`worker.policies.poll.finish_from_info`), so a late poll or a duplicate callback
  changes nothing. A body naming a result that is not an http(s) URL is refused. With
  ``KIE_CALLBACK_CONFIRM`` the body is not read: one recordInfo answer finishes the job;
* or the ``job_id`` parameter names a job whose createTask outcome is unknown (its
  answer was lost, or its worker died mid-request): the task is *adopted* only once
  recordInfo confirms that it exists and that its ``callBackUrl`` names that job. A job
  without a task takes it as its own; a job that was sent again meanwhile records it as
  a further charge (``extra_task_ids``, ``possibly_paid_twice``).

Every other callback is refused, and the caller is never told which check failed (the
reason goes to the metrics and the log only). A signature is acted on once within the
time window: it is claimed atomically before its callback is handled (:func:`claimed`), so
of two deliveries at once, whatever their bodies, one acts and the other is refused; a
delivery that could not be handled (Redis or the upstream away: :class:`CallbackUnavailable`,
answered 503) gives it back, and is handled when it is tried again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import re
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis

from worker import keys
from worker.logs import job_context
from worker.models import JobState
from worker.policies.poll import finish_from_info
from worker.policies.poll_schedule import first_poll_s
from worker.services import Services
from worker.store.jobs import ATTEMPT_FIELD
from worker.upstreams.errors import NotFoundError, UpstreamError, ValidationFailedError
from worker.upstreams.kie import TaskInfo, parse_task_info

logger = logging.getLogger("worker.callbacks")

TIMESTAMP_HEADER = "X-Webhook-Timestamp"
SIGNATURE_HEADER = "X-Webhook-Signature"
#: Unix seconds in ASCII digits. Not ``str.isdigit()``: it also takes "²" and "١٢".
TIMESTAMP = re.compile(r"[0-9]{1,12}")
#: Longest task id and job id read from a callback (a job id is at most 200 characters).
MAX_ID_CHARS = 200
#: recordInfo answers that say the task is not this key's: the callback is refused.
NOT_OURS = (NotFoundError, ValidationFailedError)
#: How far apart the clocks of two app instances may be: a claimed signature is kept this
#: much longer than its window, so that no instance takes it as fresh once it expired.
CLOCK_SKEW_S = 30
#: Longest result URL a callback's body may name.
MAX_URL_CHARS = 4096
UNSAFE_URL_CHARACTER = re.compile(r"[\x00-\x20\x7f]")


class CallbackRefused(Exception):
    """A callback that is not acted on; ``reason`` is for metrics and logs, never the caller."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class CallbackUnavailable(Exception):
    """A callback that could not be handled now (the upstream did not answer recordInfo,
    or this process cannot ask it); the upstream should deliver it again."""


@dataclass(frozen=True)
class Verified:
    """A callback whose signature and timestamp checked out."""

    task_id: str
    data: dict[str, Any]
    signature: str
    timestamp: int


def signature_for(key: str, task_id: str, timestamp: str) -> str:
    """base64(HMAC-SHA256(key, taskId + "." + timestamp))."""
    digest = hmac.new(key.encode(), f"{task_id}.{timestamp}".encode(), hashlib.sha256)
    return base64.b64encode(digest.digest()).decode()


def _header(headers: Mapping[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value.strip()
    return ""


def verify(svc: Services, body: bytes, headers: Mapping[str, str], now: float) -> Verified:
    """Check a callback's body, timestamp and signature; raises :class:`CallbackRefused`.

    Pure (no Redis, no upstream), so a flood of forged callbacks costs CPU only.
    """
    key = svc.settings.kie_webhook_hmac_key
    if key is None:
        raise CallbackRefused("disabled")
    data = _callback_data(body)
    task_id = data.get("taskId") or data.get("task_id")
    if not isinstance(task_id, str) or not task_id or len(task_id) > MAX_ID_CHARS:
        raise CallbackRefused("malformed")
    timestamp = _header(headers, TIMESTAMP_HEADER)
    if TIMESTAMP.fullmatch(timestamp) is None:
        raise CallbackRefused("bad_timestamp")
    if abs(now - int(timestamp)) > svc.settings.kie_callback_window_s:
        raise CallbackRefused("stale")
    signature = _header(headers, SIGNATURE_HEADER)
    expected = signature_for(key.get_secret_value(), task_id, timestamp)
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        raise CallbackRefused("bad_signature")
    return Verified(task_id=task_id, data=data, signature=signature, timestamp=int(timestamp))


def _callback_data(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise CallbackRefused("malformed") from None
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, dict):
        raise CallbackRefused("malformed")
    return data


def _seen_key(verified: Verified) -> str:
    return keys.callback_seen(hashlib.sha256(verified.signature.encode()).hexdigest())


@contextmanager
def claimed(svc: Services, verified: Verified, now: float) -> Iterator[None]:
    """Hold the callback's signature while acting on it (the ``with`` block).

    It is taken atomically before anything is done, so of two deliveries of one signature
    only one acts; the other gets :class:`CallbackRefused` ``replay``. Taken, it stays so for
    as long as its timestamp is within the window, unless the block raises anything but
    :class:`CallbackRefused` (Redis or the upstream away): then it is given back, so that
    the same delivery tried again is acted on.
    """
    key, ttl = _seen_key(verified), _seen_ttl(svc, verified, now)
    token = _unreleased_token(key, now) or uuid.uuid4().hex
    try:
        taken = svc.store.claim(key, token, ttl)
    except redis.RedisError:
        _note_unreleased(key, token, now + ttl)  # it may have been taken before the error
        raise
    if not taken:
        raise CallbackRefused("replay")
    try:
        yield
    except CallbackRefused:
        raise
    except BaseException:
        _release(svc, key, token, now + ttl)
        raise


def _seen_ttl(svc: Services, verified: Verified, now: float) -> int:
    """Seconds until the signature's timestamp leaves the window, plus the clock skew."""
    valid_for = verified.timestamp + svc.settings.kie_callback_window_s - now
    return max(1, math.ceil(valid_for) + CLOCK_SKEW_S)


#: Claims this process could not give back (Redis was away): key -> (token, until when).
#: The next delivery of their signature here claims it with that token, so takes it over.
_unreleased: dict[str, tuple[str, float]] = {}
_unreleased_lock = threading.Lock()
MAX_UNRELEASED = 10_000


def _release(svc: Services, key: str, token: str, until: float) -> None:
    try:
        svc.store.release(key, token)
    except redis.RedisError:
        _note_unreleased(key, token, until)


def _note_unreleased(key: str, token: str, until: float) -> None:
    with _unreleased_lock:
        if len(_unreleased) >= MAX_UNRELEASED:
            _unreleased.pop(min(_unreleased, key=lambda k: _unreleased[k][1]))
        _unreleased[key] = (token, until)


def _unreleased_token(key: str, now: float) -> str | None:
    with _unreleased_lock:
        token, until = _unreleased.pop(key, ("", 0.0))
    return token if until > now else None


def handle(svc: Services, verified: Verified, job_id_param: str | None) -> str:
    """Act on a verified callback; returns what happened.

    Answers: ``succeeded``/``failed`` (the job finished, or had finished already),
    ``pending`` (not a final state), ``extra`` (a further charge recorded), ``adopted``.
    Raises :class:`CallbackRefused`, :class:`CallbackUnavailable` or a Redis error.
    """
    job_id = svc.store.job_for_task(verified.task_id)
    if job_id is None:
        if not job_id_param:
            return _adopt(svc, verified, job_id_param)
        with job_context(job_id_param[:MAX_ID_CHARS], upstream_task_id=verified.task_id):
            return _adopt(svc, verified, job_id_param)
    with job_context(job_id, upstream_task_id=verified.task_id):
        return _known(svc, job_id, verified)


def _known(svc: Services, job_id: str, verified: Verified) -> str:
    """A callback for a task recorded for ``job_id``: finish the job, or note an extra."""
    exists, task_id = svc.store.task_of(job_id)
    if not exists:
        raise CallbackRefused("unknown_task")
    if task_id != verified.task_id:
        return "extra"  # a further charge, already on the record; it never decides the job
    return _finish(svc, job_id, verified)


def _finish(svc: Services, job_id: str, verified: Verified) -> str:
    if svc.settings.kie_callback_confirm:
        info = _record_info(svc, verified.task_id)
    else:
        info = _told(verified)
    return finish_from_info(svc, job_id, info) or "pending"


def _told(verified: Verified) -> TaskInfo:
    """The task's record as the callback's body tells it; refuses one that is unreadable
    or names a result that is not an http(s) URL."""
    try:
        info = parse_task_info({**verified.data, "taskId": verified.task_id})
    except UpstreamError:
        raise CallbackRefused("bad_record") from None
    if not all(_is_web_url(url) for url in info.result_urls):
        raise CallbackRefused("bad_record")
    return info


def _is_web_url(url: str) -> bool:
    """An absolute http(s) URL with a host, without whitespace or control characters."""
    if len(url) > MAX_URL_CHARS or UNSAFE_URL_CHARACTER.search(url):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _adopt(svc: Services, verified: Verified, job_id: str | None) -> str:
    """Take on a task the upstream created for a job whose createTask outcome is unknown."""
    if not job_id or len(job_id) > MAX_ID_CHARS:
        raise CallbackRefused("unknown_task")
    record = svc.store.get(job_id)
    if record is None:
        raise CallbackRefused("unknown_task")
    attempt_open = svc.store.get_internal(job_id, ATTEMPT_FIELD) is not None
    if not (record.unknown_outcomes > 0 or (attempt_open and not record.upstream_task_id)):
        return _recorded_meanwhile(svc, verified)
    info = _confirm(svc, verified.task_id, job_id)
    outcome = svc.store.accept(job_id, "", verified.task_id, first_poll_s(svc.settings))
    if outcome == "missing":
        raise CallbackRefused("unknown_task")
    adopted = outcome.startswith("accepted") or (
        outcome == "again" and _task_of(svc, job_id) == verified.task_id
    )
    logger.warning(
        "job %s%s: callback for upstream task %s of a createTask whose answer was lost: %s",
        job_id,
        " submitted" if adopted else "",
        verified.task_id,
        "adopted" if adopted else f"recorded ({outcome})",
        extra={"state": JobState.SUBMITTED.value} if adopted else {},
    )
    if outcome in ("accepted_after_unknown", "extra"):
        svc.metrics.count("possibly_paid_twice_total")
    if not adopted:
        return "extra"
    finish_from_info(svc, job_id, info)
    return "adopted"


def _recorded_meanwhile(svc: Services, verified: Verified) -> str:
    """A task unknown when looked up may have been recorded since (its worker's own answer
    came): then it is a known task; otherwise the callback is refused."""
    job_id = svc.store.job_for_task(verified.task_id)
    if job_id is None:
        raise CallbackRefused("unknown_task")
    with job_context(job_id, upstream_task_id=verified.task_id):
        return _known(svc, job_id, verified)


def _task_of(svc: Services, job_id: str) -> str | None:
    record = svc.store.get(job_id)
    return None if record is None else record.upstream_task_id


def _confirm(svc: Services, task_id: str, job_id: str) -> TaskInfo:
    """Ask recordInfo whether the task exists and was created for ``job_id``."""
    info = _record_info(svc, task_id)
    if job_id not in _callback_job_ids(info.param):
        raise CallbackRefused("unconfirmed")
    return info


def _record_info(svc: Services, task_id: str) -> TaskInfo:
    """The task's record as recordInfo answers it, asked once.

    Only an answer refuses the task (it is not this key's); no answer (an upstream error, a
    timeout) says nothing about it, and the callback is to come again.
    """
    if svc.settings.kie_api_key is None:
        logger.error("callback for task %s cannot be confirmed: KIE_API_KEY is not set", task_id)
        raise CallbackUnavailable("KIE_API_KEY is not set")
    try:
        return svc.client().record_info(task_id)
    except NOT_OURS:
        raise CallbackRefused("unconfirmed") from None
    except UpstreamError as exc:
        logger.warning("callback for task %s: recordInfo failed (%s)", task_id, exc)
        raise CallbackUnavailable(f"recordInfo: {exc.fail_code}") from None


def _callback_job_ids(param: str | None) -> list[str]:
    """The ``job_id`` query values of the ``callBackUrl`` in a task's recorded request."""
    try:
        body = json.loads(param or "")
    except (ValueError, RecursionError):
        return []
    url = body.get("callBackUrl") if isinstance(body, dict) else None
    if not isinstance(url, str):
        return []
    return parse_qs(urlsplit(url).query).get("job_id", [])
