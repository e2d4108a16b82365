"""The notify policy: one delivery of a finished job's completion webhook.

A step runs for the ``remix.notify`` message carrying the webhook's latest token (see
:mod:`worker.store.notify`). It POSTs the job's public record, as it is at that moment,
plus a ``delivery_id`` that is the same for every try of one job (receivers drop
duplicates by it: delivery is at least once). It then records the outcome: a 2xx answer
delivers; any other answer, a timeout or a connection error schedules another try after
a backoff with full jitter, until ``REMIX_NOTIFY_MAX_ATTEMPTS`` tries were made; a URL
whose host is (or now resolves to) an address that is not public fails at once without
``REMIX_NOTIFY_ALLOW_PRIVATE`` (:mod:`worker.net.outbound`, which also connects only to the
address it checked).

The request is signed when ``REMIX_NOTIFY_HMAC_KEY`` is set::

    X-Remixq-Signature: sha256=<hex HMAC-SHA256(key, timestamp + "." + body)>

with ``X-Remixq-Timestamp`` (Unix seconds, new for each try) and ``X-Remixq-Delivery``.
A delivery never holds a worker slot long: it has a total deadline
(``REMIX_NOTIFY_TIMEOUT_S``, enforced by cutting the socket), follows no redirect, reads
no response body, uses no proxy, and the receiver's in-flight limit
keeps a receiver that hangs to one slot. Nothing about the URL beyond its
``scheme://host:port`` is logged: its path or query may hold a secret of the producer's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import requests

from worker.logs import job_context
from worker.models import JobRecord, Notification
from worker.net import deadline, outbound
from worker.policies.retry import side_work_try
from worker.services import Services
from worker.settings import Settings
from worker.store.notify import NotifyStore, NotifyTarget, notify_store

logger = logging.getLogger("worker.notify")

DELIVERY_HEADER = "X-Remixq-Delivery"
TIMESTAMP_HEADER = "X-Remixq-Timestamp"
SIGNATURE_HEADER = "X-Remixq-Signature"
SIGNATURE_PREFIX = "sha256="
USER_AGENT = "remixq-webhook/1"
#: Longest wait for the connection, and for each read of the answer's head.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 5.0
#: Delivery ids are UUIDs derived from the job, so every try of one job has the same.
_DELIVERY_NAMESPACE = uuid.UUID("5b0a3f0e-6d1c-4f7e-9a57-2f4d8c1e7b21")


def signature(key: str, timestamp: str, body: bytes) -> str:
    """``sha256=`` + hex HMAC-SHA256(key, timestamp + "." + body)."""
    digest = hmac.new(key.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return SIGNATURE_PREFIX + digest.hexdigest()


def delivery_id(record: JobRecord) -> str:
    """The same for every try of one job's webhook; another job's differs."""
    return str(uuid.uuid5(_DELIVERY_NAMESPACE, f"{record.job_id}:{record.finished_at!r}"))


def webhook_body(record: JobRecord) -> bytes:
    """The public record as it is now, plus its ``delivery_id``."""
    payload = {**record.model_dump(mode="json"), "delivery_id": delivery_id(record)}
    return json.dumps(payload, separators=(",", ":")).encode()


def webhook_headers(
    settings: Settings, record: JobRecord, timestamp: str, body: bytes
) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        DELIVERY_HEADER: delivery_id(record),
        TIMESTAMP_HEADER: timestamp,
    }
    key = settings.remix_notify_hmac_key
    if key is not None:
        headers[SIGNATURE_HEADER] = signature(key.get_secret_value(), timestamp, body)
    return headers


@dataclass(frozen=True)
class Attempt:
    """How one try went: ``error`` is None when the receiver answered 2xx."""

    error: str | None = None
    #: The address may not be sent to: no further try.
    refused: bool = False


def notify_step(svc: Services, job_id: str, token: int, receiver: str) -> str:
    """One delivery of the job's webhook; returns what happened (for logs and tests).

    ``delivered``, ``retry``, ``failed``; ``stale`` (a newer message owns the webhook),
    ``missing`` (the record expired) or ``dropped`` (nothing pending to deliver).
    Its log lines carry the job's fields (:mod:`worker.logs`).
    """
    with job_context(job_id):
        return _notify_step(svc, job_id, token, receiver)


def _notify_step(svc: Services, job_id: str, token: int, receiver: str) -> str:
    store = notify_store(svc)
    target = store.target(job_id)
    if target is None:
        store.end(job_id, token, receiver, "dropped")
        return "missing"
    if target.token != token:
        return "stale"
    pending = target.record.notification
    if pending is None or pending.state != "pending" or target.url is None:
        store.end(job_id, token, receiver, "dropped")
        return "dropped"
    attempt = deliver(svc, target)
    return _record(svc, store, target, token, receiver, attempt)


def deliver(svc: Services, target: NotifyTarget) -> Attempt:
    """POST the record to the job's URL once."""
    assert target.url is not None
    timestamp = str(int(svc.clock.now()))
    body = webhook_body(target.record)
    headers = webhook_headers(svc.settings, target.record, timestamp, body)
    return post(target.url, body, headers, svc.settings)


def post(url: str, body: bytes, headers: dict[str, str], settings: Settings) -> Attempt:
    """One POST through the outbound guard, with a total deadline; the answer's status
    only (its body is never read)."""
    total = settings.remix_notify_timeout_s
    timeouts = (min(CONNECT_TIMEOUT_S, total), min(READ_TIMEOUT_S, total))
    guard = outbound.Guard(allow_private=settings.remix_notify_allow_private)
    session = outbound.thread_session(guard)
    with deadline.deadline(total) as limit:
        try:
            response = session.post(
                url,
                data=body,
                headers=headers,
                timeout=timeouts,
                allow_redirects=False,
                stream=True,
            )
        except outbound.Unresolved as exc:
            return Attempt(str(exc))
        except outbound.Refused as exc:
            return Attempt(str(exc), refused=True)
        except outbound.OutboundError as exc:
            return Attempt(f"refused: {exc}", refused=True)
        except requests.RequestException as exc:
            return Attempt(describe_request_error(exc, expired=limit.expired, total=total))
        except Exception as exc:  # an odd URL or answer urllib3 chokes on: still a try
            return Attempt(f"request failed ({type(exc).__name__})")
        status = response.status_code
        response.close()
    if 200 <= status < 300:
        return Attempt()
    if 300 <= status < 400:
        return Attempt(f"HTTP {status}, a redirect (not followed)")
    return Attempt(f"HTTP {status}")


def describe_request_error(exc: requests.RequestException, *, expired: bool, total: float) -> str:
    """A short reason without the URL (requests' messages carry its path and query)."""
    if expired:
        return f"no answer within {total:g} s"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS handshake failed (certificate not trusted, or not TLS)"
    if isinstance(exc, requests.ConnectionError):
        return (
            "connection refused" if _caused_by(exc, ConnectionRefusedError) else "connection failed"
        )
    return f"request failed ({type(exc).__name__})"


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``kind`` is somewhere in the chain (urllib3 wraps the cause in ``reason``)."""
    seen: set[int] = set()
    pending: list[Any] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return True
        if isinstance(current, BaseException):
            pending += [current.__cause__, current.__context__, getattr(current, "reason", None)]
            pending += [arg for arg in current.args if isinstance(arg, BaseException)]
    return False


def _record(
    svc: Services,
    store: NotifyStore,
    target: NotifyTarget,
    token: int,
    receiver: str,
    attempt: Attempt,
) -> str:
    """Write the try's outcome and count it."""
    settings = svc.settings
    job_id = target.record.job_id
    attempts = (target.record.notification.attempts if target.record.notification else 0) + 1
    decided = side_work_try(
        attempts,
        failed=attempt.error is not None,
        permanent=attempt.refused,
        most=settings.remix_notify_max_attempts,
        base=settings.remix_notify_retry_base_s,
        cap=settings.remix_notify_retry_max_s,
    )
    outcome, retry_in = decided.outcome, decided.retry_in
    if outcome == "done":
        outcome = "delivered"
        note = Notification(state="delivered", attempts=attempts, delivered_at=svc.clock.now())
    else:
        state = "pending" if outcome == "retry" else "failed"
        note = Notification(state=state, attempts=attempts, last_error=attempt.error)
    if store.end(job_id, token, receiver, outcome, note, retry_in) != "ok":
        return "stale"
    svc.metrics.count(f"notify_total:{outcome}")
    _log(job_id, receiver, outcome, note, retry_in, settings.remix_notify_max_attempts)
    return outcome


def _log(
    job_id: str, receiver: str, outcome: str, note: Notification, retry_in: float, most: int
) -> None:
    if outcome == "delivered":
        logger.info("job %s: webhook delivered to %s (try %d)", job_id, receiver, note.attempts)
    elif outcome == "retry":
        logger.warning(
            "job %s: webhook to %s failed (%s), try %d of %d; next in %.1f s",
            job_id,
            receiver,
            note.last_error,
            note.attempts,
            most,
            retry_in,
        )
    else:
        logger.warning(
            "job %s: webhook to %s given up after %d tries (%s)",
            job_id,
            receiver,
            note.attempts,
            note.last_error,
        )
