"""The Python API other services use: ``enqueue_remix``, ``get_job``, ``wait_for_job``.

A request is validated completely before anything is written or enqueued;
bad input raises :class:`~worker.models.InvalidRequestError`, a ``ValueError``
whose message is one line naming every bad field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from worker.jobstore import REQUEST_FIELD, TASK_SENT_FIELD
from worker.models import InvalidRequestError, JobRecord, JobState, validate_request
from worker.runtime import job_store
from worker.tasks import send_submit
from worker.watchdog import STALL_S

#: wait_for_job's first and longest pause between reads of the record.
WAIT_POLL_INITIAL_S = 0.2
WAIT_POLL_MAX_S = 2.0
MAX_IDEMPOTENCY_KEY_CHARS = 200


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
    store = job_store()
    job_id, created = store.create(uuid.uuid4().hex, idempotency_key=idempotency_key)
    if not created and not _needs_sending(job_id):
        return job_id
    # A new job, or one whose producer died between writing it and sending it.
    payload = request.upstream_input()
    store.set_internal(job_id, REQUEST_FIELD, payload)
    store.expect_progress(job_id, STALL_S)
    send_submit(job_id, payload)
    store.set_internal(job_id, TASK_SENT_FIELD, True)
    return job_id


def _needs_sending(job_id: str) -> bool:
    """An earlier job with this key whose producer died before sending it."""
    store = job_store()
    if store.get_internal(job_id, TASK_SENT_FIELD):
        return False
    record = store.get(job_id)
    return record is not None and record.state is JobState.QUEUED


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
    return job_store().get(job_id)


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
