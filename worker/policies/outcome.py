"""Ending a job: the record moves to its final state, then the outcome becomes its Celery result.

Shared by both policies. A job that has already finished is left alone, so duplicated
polls (and, later, late callbacks) are harmless. A finished job's source files leave the
blob store (best effort: their time to live is the safety net).
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from worker.logs import job_fields
from worker.models import JobState
from worker.services import Services
from worker.store.blobs import BlobStoreError, refs_in
from worker.store.jobs import REQUEST_FIELD
from worker.task_outcomes import note_outcome

logger = logging.getLogger("worker.jobs")


def finish_job(svc: Services, job_id: str, state: JobState, **fields: Any) -> bool:
    """Move a job to ``state``; False (and nothing changed) when it had already finished."""
    # The record read with the write gives the result and the request (its source files).
    changed, found = svc.store.finish_reading(job_id, state, **fields)
    if not changed:
        return False
    record, stored = found if found is not None else (None, {})
    delete_blobs(svc, job_id, stored.get(REQUEST_FIELD))
    note_outcome(job_id, state, fields)
    if record is not None:
        svc.results.store(record)
        finished = f"jobs_finished_total:{record.fail_code or state.value}"
        if record.finished_at is not None:
            took = record.finished_at - record.created_at
            svc.metrics.observe("job_seconds", took, counting=finished)
        else:
            svc.metrics.count(finished)
    logger.info(
        "job %s %s%s",
        job_id,
        state.value,
        f" ({fields['fail_code']}: {fields.get('fail_msg') or ''})"
        if fields.get("fail_code")
        else "",
        extra=job_fields(job_id, state=state.value),
    )
    return True


def delete_blobs(svc: Services, job_id: str, request: Any = None) -> None:
    """Delete a finished job's source files (those of ``request``, else of its stored
    request); an error here must not cost the job."""
    try:
        if request is None:
            request = svc.store.get_internal(job_id, REQUEST_FIELD)
        refs = refs_in(request)
        if refs:
            svc.blobs.delete(refs)
    except (redis.RedisError, OSError, BlobStoreError) as exc:
        logger.warning("job %s: its source files stay until they expire (%s)", job_id, exc)


def fail_job(svc: Services, job_id: str, fail_code: str, fail_msg: str) -> bool:
    return finish_job(svc, job_id, JobState.FAILED, fail_code=fail_code, fail_msg=fail_msg)
