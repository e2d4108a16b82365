"""The Python API other services use: ``enqueue_remix``, ``get_job``, ``wait_for_job``.

A request is validated completely before anything is written or enqueued; bad input
raises :class:`~worker.models.InvalidRequestError`, a ``ValueError`` whose message is one
line naming every bad field.

Enqueueing is one atomic write: the job's record, its request and its place in the
schedule. From then on the job *will* be sent, by the schedule if by nothing else; the
``remix.submit`` message published right after is only the fast path. So
``enqueue_remix`` either returns (the job is durably queued) or raises with nothing
written. (If Redis accepted the write but its answer was lost, the call raises although
the job exists: the same ``idempotency_key`` on the retry finds it.)
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any

import kombu.exceptions
import redis

from worker.models import InvalidRequestError, JobRecord, validate_request
from worker.runtime import services

logger = logging.getLogger("producers")

#: wait_for_job's first and longest pause between reads of the record.
WAIT_POLL_INITIAL_S = 0.2
WAIT_POLL_MAX_S = 2.0
MAX_IDEMPOTENCY_KEY_CHARS = 200
_PUBLISH_ERRORS = (kombu.exceptions.KombuError, redis.RedisError, OSError)


def enqueue_remix(
    prompt: str,
    image_url: str,
    reference_image_urls: list[str],
    idempotency_key: str | None = None,
    **other_input_fields: Any,
) -> str:
    """Validate a remix request and enqueue it; returns the job id.

    Parameters:
        prompt, image_url, reference_image_urls: the required createTask input fields.
        idempotency_key: the same key returns the same job id and enqueues nothing new.
        other_input_fields: any optional input field (``strength=0.5``, ``num_images="2"`` ...).
    """
    request = validate_request(
        {
            "prompt": prompt,
            "image_url": image_url,
            "reference_image_urls": reference_image_urls,
            **other_input_fields,
        }
    )
    check_idempotency_key(idempotency_key)
    svc = services()
    payload = request.upstream_input()
    job_id, created = svc.store.create(
        uuid.uuid4().hex,
        payload,
        due_in=svc.settings.lease_s,
        idempotency_key=idempotency_key,
    )
    if created:
        _send_first_step(job_id, payload)
    return job_id


def _send_first_step(job_id: str, payload: dict[str, Any]) -> None:
    """Publish the first submit; if the broker is away, the schedule sends it instead."""
    svc = services()
    try:
        svc.publisher.submit(job_id, payload, 0, retry=False)
    except _PUBLISH_ERRORS as exc:
        logger.warning(
            "job %s queued; the broker is unavailable (%s), it is sent later", job_id, exc
        )
        # Still scheduled if this fails too: then it is sent after its lease.
        with contextlib.suppress(redis.RedisError):
            svc.store.due_now([job_id])


def check_idempotency_key(key: str | None) -> None:
    if key is None:
        return
    if not isinstance(key, str) or not key.strip() or len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidRequestError(
            f"invalid request: idempotency_key must be a non-empty string of at most "
            f"{MAX_IDEMPOTENCY_KEY_CHARS} characters"
        )


def get_job(job_id: str) -> JobRecord | None:
    """The job's record, or None when there is no such job (or it expired)."""
    return services().store.get(job_id)


def wait_for_job(job_id: str, timeout: float = 60) -> JobRecord:
    """Block until the job finishes; raises ``TimeoutError`` after ``timeout`` seconds.

    Raises ``KeyError`` when there is no such job.
    """
    deadline = time.monotonic() + timeout
    pause = WAIT_POLL_INITIAL_S
    while True:
        record = get_job(job_id)
        if record is None:
            raise KeyError(f"no job {job_id!r}")
        if record.finished:
            return record
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"job {job_id} still {record.state.value} after {timeout:g}s")
        time.sleep(min(pause, remaining))
        pause = min(pause * 1.5, WAIT_POLL_MAX_S)
