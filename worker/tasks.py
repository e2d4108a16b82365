"""The pipeline's tasks: ``remix.submit`` and the ``remix.poll`` chain.

``remix.submit`` (queue ``submit``) validates the request, takes the job's
submit claim, calls createTask once, and on success records the upstream task
and schedules the first poll. Retryable upstream errors are retried with
exponential backoff and full jitter; permanent ones fail the job.

``remix.poll`` (queue ``poll``) asks recordInfo once for each job of a poll
batch and either finishes the job or puts it in a later batch, with a growing
delay. Jobs due within the same quarter second share a batch (of at most
``POLL_BATCH_SIZE``), whose message is sent with a countdown by the first job
to join it. No task ever sleeps: between polls a job costs a set member and a
share of one message in Redis, no worker slot.

Never paying twice: createTask is only called by the holder of the job's
submit claim (an atomic ``SET NX EX`` in Redis) and only while the record has
no ``upstream_task_id``. A redelivered or duplicated submit therefore never
creates a second upstream task, with one exception nothing on our side can
close: a createTask request that the upstream accepted but whose answer never
reached us (a read timeout, a connection reset after sending, or the worker
killed mid-request). The upstream offers no idempotency key, so the job is
retried and may be charged twice; the window is one request long.
"""

from __future__ import annotations

import math
import time
from typing import Any

import redis
from celery import Task, states
from celery.utils.log import get_task_logger

from worker.app import SUBMIT_QUEUE, app
from worker.backoff import full_jitter, poll_delay
from worker.errors import (
    InsufficientCreditsError,
    JobFailed,
    MaintenanceError,
    PermanentUpstreamError,
    RateLimitedError,
    RetryableUpstreamError,
    UpstreamError,
    redact,
)
from worker.gates import Defer, budget_gate, hold_after_rate_limited, pause_gate, trip_pause
from worker.jobstore import KEY_PREFIX, LAST_ERROR_FIELD, REQUEST_FIELD, RETRIES_FIELD
from worker.kie import TaskInfo
from worker.models import InvalidRequestError, JobRecord, JobState, RemixRequest, validate_request
from worker.runtime import job_store, kie_client
from worker.settings import MAX_COUNTDOWN_S, Settings, get_settings
from worker.watchdog import STALL_S

logger = get_task_logger(__name__)

#: Polls due within the same slot of this many seconds share one task.
POLL_SLOT_S = 0.25
#: At most this many jobs per poll task, so that one batch takes well under a second.
POLL_BATCH_SIZE = 25
#: Wait after a Redis error before the task tries again.
STORE_RETRY_DELAY_S = 5.0
POLL_LATENESS_KEY = KEY_PREFIX + "stats:poll_lateness"
POLL_LATENESS_SAMPLES = 10_000
#: Upstream states that map onto job states while the job is still pending.
PENDING_JOB_STATES = {
    "waiting": JobState.SUBMITTED,
    "queuing": JobState.SUBMITTED,
    "generating": JobState.RUNNING,
}


def _secrets(settings: Settings) -> list[str | None]:
    keys = (settings.kie_api_key, settings.kie_webhook_hmac_key, settings.ideogram_api_key)
    return [k.get_secret_value() if k else None for k in keys]


def finish_job(job_id: str, state: JobState, **fields: Any) -> bool:
    """Move a job to a final state and store the outcome as its Celery result.

    Returns False (and changes nothing) when the job had already finished, so
    duplicated polls and late callbacks are harmless.
    """
    store = job_store()
    if not store.update(job_id, state, finished_at=time.time(), **fields):
        return False
    store.forget_progress(job_id)
    record = store.get(job_id)
    if state is JobState.SUCCEEDED and record is not None:
        app.backend.store_result(job_id, record.model_dump(mode="json"), states.SUCCESS)
    else:
        failure = JobFailed(
            str(fields.get("fail_code") or state.value), fields.get("fail_msg") or ""
        )
        app.backend.store_result(job_id, failure, states.FAILURE)
    logger.info("job %s %s %s", job_id, state.value, fields.get("fail_code") or "")
    return True


def fail_job(job_id: str, fail_code: str, fail_msg: str) -> bool:
    return finish_job(job_id, JobState.FAILED, fail_code=fail_code, fail_msg=fail_msg)


def apply_task_info(job_id: str, info: TaskInfo, current: JobState | None = None) -> bool:
    """Record what the upstream says about a job's task; True when the job finished.

    ``current`` is the state the caller last read; an unchanged state is not rewritten.
    """
    if info.state == "success":
        finish_job(job_id, JobState.SUCCEEDED, result_urls=info.result_urls)
        return True
    if info.state == "fail":
        fail_job(job_id, info.fail_code or "fail", info.fail_msg or "generation failed upstream")
        return True
    pending = PENDING_JOB_STATES.get(info.state)
    if pending is None:
        logger.warning("job %s: unknown upstream state %r, still polling", job_id, info.state)
    elif pending is not current:
        job_store().update(job_id, pending)
    return False


def send_submit(job_id: str, request: dict[str, Any]) -> None:
    """Send ``remix.submit`` for a job (its task id is the job id)."""
    remix_submit.apply_async(
        kwargs={"request": request, "job_id": job_id}, task_id=job_id, queue=SUBMIT_QUEUE
    )


def schedule_poll(job_id: str, countdown: float) -> None:
    """Poll the job again in ``countdown`` seconds, in the batch of that moment's slot.

    The slot is rounded up, so a poll never comes early; the first job of a
    batch sends the batch's ``remix.poll`` message.
    """
    due = time.time() + min(max(countdown, 0.0), MAX_COUNTDOWN_S)
    slot_at = math.ceil(due / POLL_SLOT_S) * POLL_SLOT_S
    batch, first = job_store().add_to_poll_batch(job_id, f"{slot_at:.2f}", POLL_BATCH_SIZE)
    if first:
        remix_poll.apply_async(kwargs={"batch": batch}, countdown=max(0.0, slot_at - time.time()))


# ---------------------------------------------------------------- remix.submit


@app.task(
    name="remix.submit",
    bind=True,
    max_retries=None,
    ignore_result=True,
    autoretry_for=(redis.ConnectionError, redis.TimeoutError),
    default_retry_delay=STORE_RETRY_DELAY_S,
)
def remix_submit(
    self: Task, request: dict[str, Any], job_id: str | None = None, slot: float | None = None
) -> None:
    """Submit one job upstream. ``request`` holds the createTask ``input`` fields.

    ``job_id`` defaults to this task's id, so producers in other languages may
    send ``remix.submit`` with only ``request``. ``slot`` is internal: the
    moment the shared budget reserved for this send.
    """
    job_id = job_id or self.request.id
    store = job_store()
    if store.create(job_id)[1]:  # a foreign producer sent no record
        store.set_internal(job_id, REQUEST_FIELD, request)
    store.expect_progress(job_id, STALL_S)
    try:
        remix_request = validate_request(request)
    except InvalidRequestError as exc:
        fail_job(job_id, "invalid_request", str(exc))
        return
    try:
        defer = _submit_once(job_id, remix_request, slot)
    except (redis.ConnectionError, redis.TimeoutError):
        raise
    except Exception as exc:
        _fail_on_bug(job_id, exc)
        raise
    if defer is not None:
        kwargs = {"request": request, "job_id": job_id, "slot": defer.slot}
        raise self.retry(countdown=min(defer.countdown, MAX_COUNTDOWN_S), kwargs=kwargs)


def _submit_once(job_id: str, request: RemixRequest, slot: float | None) -> Defer | None:
    """One pass of the submit policy; returns a deferral when it must run again."""
    settings = get_settings()
    store = job_store()
    record = store.get(job_id)
    if record is None or record.finished:
        return None
    if record.upstream_task_id:
        # Redelivered after createTask succeeded: make sure the job is polled.
        # The job belongs to its latest batch only; an earlier one skips it.
        schedule_poll(job_id, settings.remix_poll_initial_s)
        return None
    if time.time() - record.created_at > settings.remix_submit_deadline_s:
        _fail_past_submit_deadline(job_id, settings)
        return None
    held = pause_gate(job_id)
    if held is not None:
        return held
    lease_s = math.ceil(settings.kie_connect_timeout_s + settings.kie_read_timeout_s + 10)
    if not store.claim_submit(job_id, lease_s):
        return Defer(float(max(1, store.submit_claim_ttl(job_id))))
    try:
        return budget_gate(slot) or _create_upstream_task(job_id, request, settings)
    finally:
        store.release_submit(job_id)


def _fail_past_submit_deadline(job_id: str, settings: Settings) -> None:
    last = job_store().get_internal(job_id, LAST_ERROR_FIELD) or {}
    fail_job(
        job_id,
        last.get("code", "submit_timeout"),
        f"not accepted upstream within {settings.remix_submit_deadline_s:g}s"
        + (f"; last error: {last['msg']}" if last.get("msg") else ""),
    )


def _create_upstream_task(job_id: str, request: RemixRequest, settings: Settings) -> Defer | None:
    store = job_store()
    attempts = store.increment(job_id, "submit_attempts") or 1
    try:
        task_id = kie_client().create_task(request.upstream_input(), settings.kie_callback_url)
    except (MaintenanceError, InsufficientCreditsError) as exc:
        # The whole key is unusable: hold every job, spend no job's retries.
        _remember_error(job_id, exc, settings)
        trip_pause(exc.code, exc.message)
        return pause_gate(job_id) or Defer(MAX_COUNTDOWN_S / 2)
    except RetryableUpstreamError as exc:
        return _after_retryable_error(job_id, exc, attempts, settings)
    except PermanentUpstreamError as exc:
        fail_job(job_id, exc.fail_code, exc.message or type(exc).__name__)
        return None
    store.update(job_id, JobState.SUBMITTED, upstream_task_id=task_id, submitted_at=time.time())
    schedule_poll(job_id, settings.remix_poll_initial_s)
    logger.info("job %s accepted upstream as %s (attempt %d)", job_id, task_id, attempts)
    return None


def _remember_error(job_id: str, exc: UpstreamError, settings: Settings) -> str:
    message = redact(exc.message or type(exc).__name__, _secrets(settings))
    job_store().set_internal(job_id, LAST_ERROR_FIELD, {"code": exc.fail_code, "msg": message})
    return message


def _after_retryable_error(
    job_id: str, exc: UpstreamError, attempts: int, settings: Settings
) -> Defer | None:
    message = _remember_error(job_id, exc, settings)
    retries_used = (job_store().increment(job_id, RETRIES_FIELD) or 1) - 1
    if retries_used >= settings.remix_max_retries:
        fail_job(job_id, exc.fail_code, f"{message} (gave up after {attempts} attempts)")
        return None
    delay = full_jitter(
        retries_used,
        base=settings.remix_retry_base_s,
        cap=settings.remix_retry_max_s,
        floor=exc.retry_after or 0.0,
    )
    if isinstance(exc, RateLimitedError):
        hold_after_rate_limited(exc.retry_after, delay)
    logger.warning(
        "job %s: createTask %s (attempt %d), retrying in %.1fs", job_id, exc, attempts, delay
    )
    return Defer(delay)


# ------------------------------------------------------------------ remix.poll


@app.task(
    name="remix.poll",
    bind=True,
    max_retries=None,
    ignore_result=True,
)
def remix_poll(self: Task, batch: str) -> None:
    """Poll every job of ``batch`` once (recordInfo), then finish or reschedule each.

    Jobs due in the same short slot share one task, so a poll costs one HTTP
    request and a few Redis commands rather than a whole task; thousands of
    jobs in flight stay cheap.
    """
    store = job_store()
    try:
        store.close_poll_slot(batch.split(":", 1)[0])
        records = store.poll_batch(batch)
        store.expect_progress([r.job_id for r in records], STALL_S)
        late_by = []
        due_at = float(batch.split(":", 1)[0])
        for record in records:
            late_by.append(time.time() - due_at)
            _poll_job(record)
        store.drop_poll_batch(batch)
        _record_lateness(late_by)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        # Jobs already polled have moved to later batches and are skipped.
        raise self.retry(countdown=STORE_RETRY_DELAY_S, exc=exc) from None


def _poll_job(record: JobRecord) -> None:
    try:
        _poll_once(record)
    except (redis.ConnectionError, redis.TimeoutError):
        raise
    except Exception as exc:
        _fail_on_bug(record.job_id, exc)


def _fail_on_bug(job_id: str, exc: Exception) -> None:
    """An unexpected error would leave the job hanging: give it a clear answer."""
    message = redact(f"{type(exc).__name__}: {exc}", _secrets(get_settings()))
    logger.exception("job %s: unexpected error", job_id)
    fail_job(job_id, "internal_error", message)


def _record_lateness(late_by: list[float]) -> None:
    """Keep a sample of how late polls start after they were due (for the benchmark)."""
    if not late_by:
        return
    pipe = job_store().redis.pipeline(transaction=False)
    pipe.lpush(POLL_LATENESS_KEY, *(f"{seconds:.4f}" for seconds in late_by))
    pipe.ltrim(POLL_LATENESS_KEY, 0, POLL_LATENESS_SAMPLES - 1)
    pipe.execute()


def _poll_once(record: JobRecord) -> None:
    settings = get_settings()
    store = job_store()
    job_id = record.job_id
    if not record.upstream_task_id:
        return
    now = time.time()
    deadline_at = (record.submitted_at or record.created_at) + settings.remix_deadline_s
    if now >= deadline_at:
        fail_job(job_id, "timeout", f"not finished upstream within {settings.remix_deadline_s:g}s")
        return
    polls = store.increment(job_id, "polls") or record.polls + 1
    next_delay = poll_delay(
        polls + 1, initial=settings.remix_poll_initial_s, maximum=settings.remix_poll_max_s
    )
    try:
        info = kie_client().record_info(record.upstream_task_id)
    except RetryableUpstreamError as exc:
        logger.warning("job %s: recordInfo %s, polling again", job_id, exc)
        next_delay = max(next_delay, exc.retry_after or 0.0)
    except PermanentUpstreamError as exc:
        fail_job(job_id, exc.fail_code, exc.message or type(exc).__name__)
        return
    else:
        if apply_task_info(job_id, info, record.state):
            return
    # Wake up no later than just past the deadline, so a timeout is reported on time.
    schedule_poll(job_id, min(next_delay, deadline_at - now + 0.05))
