"""The submit policy: one step of a job that has no upstream task yet.

The step runs only for the message carrying the job's latest dispatch token and never
sleeps: it passes the gates (:mod:`worker.policies.gates`), uploads the job's files
(kie) or reads its image (the relay), opens a createTask *attempt* and sends once; or it
parks the job in the schedule, or ends it. The accepted task id is logged at once, then
written through a Redis outage (:func:`record_acceptance`).

Why an attempt means createTask is never paid twice, the relay's synchronous answers and
unknown outcomes: docs/design.md, "createTask attempts" and "Source images from files";
the one window that remains: docs/reliability.md.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

import redis
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from worker import keys
from worker.fields import BlobRef
from worker.fleet.dispatcher import LIVE_WORKER_S
from worker.limits.pause import PauseState, RecentAnswers
from worker.limits.ratelimit import return_grant
from worker.logs import job_context, job_fields, note
from worker.models import InvalidRequestError, JobState, RemixRequest, validate_request
from worker.policies.gates import (
    Wait,
    back_in_line,
    back_in_line_if_resumed,
    hold_after_rate_limited,
    line_gate,
    pause_gate,
    refund_spend,
    spend_gate,
    trip_pause,
    use_send_moment,
)
from worker.policies.outcome import fail_job, finish_job
from worker.policies.poll_schedule import first_poll_s
from worker.policies.retry import (
    Action,
    gives_up,
    key_hold_delay,
    submit_action,
    submit_retry_delay,
)
from worker.relay_models import IdeogramRemixRequest
from worker.services import Services
from worker.store.blobs import BlobMissing, BlobStoreError
from worker.store.jobs import (
    GRANT_FIELD,
    HOLDS_FIELD,
    LAST_ERROR_FIELD,
    REFUSED_402_FIELD,
    RELAY_RESULTS_FIELD,
    RETRIES_FIELD,
    SPEND_FIELD,
    UPLOADS_FIELD,
    Job,
)
from worker.upstreams.errors import (
    InsufficientCreditsError,
    MaintenanceError,
    NetworkError,
    RateLimitedError,
    UpstreamError,
)
from worker.upstreams.kie_upload import UPLOAD_LIFETIME_S
from worker.upstreams.providers import ProviderNotConfigured
from worker.upstreams.relay import RemixAnswer

logger = logging.getLogger("worker.submit")

#: Spread added to the wait for an open attempt to settle.
SETTLE_JITTER_S = 1.0
#: How long a worker keeps trying to record an accepted task id through a Redis outage.
RECORD_PATIENCE_S = 3600.0
#: Longest wait between two tries, so the id is written within a second of Redis's return.
RECORD_RETRY_WAIT_S = 1.0
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)
#: The task id recorded for a relay answer that held the images themselves.
SYNC_TASK_PREFIX = "sync-"
UNKNOWN_OUTCOME = "unknown_outcome"
#: How long a job waits for a worker that can send it (another provider's worker met it).
PROVIDER_ELSEWHERE_WAIT_S = 2.0
#: An uploaded file is uploaded again when the upstream would delete it within this long.
UPLOAD_REUSE_MARGIN_S = 6 * 3600.0


class AcceptedButUnrecorded(Exception):
    """createTask was accepted but Redis stayed away for :data:`RECORD_PATIENCE_S`."""

    def __init__(self, job_id: str, attempt_id: str, task_id: str) -> None:
        self.job_id = job_id
        self.attempt_id = attempt_id
        self.task_id = task_id
        super().__init__(f"job {job_id}: upstream task {task_id} accepted but not recorded")


def submit_step(svc: Services, job_id: str, token: int) -> str:
    """One step of the submit policy; returns what happened (for logs and tests).

    Every line logged during the step carries the job's fields (:mod:`worker.logs`).
    """
    with job_context(job_id):
        return _submit_step(svc, job_id, token)


def _submit_step(svc: Services, job_id: str, token: int) -> str:
    status, job, pause_read = _begin(svc, job_id, token)
    if job is None:
        return status
    note(upstream_task_id=job.record.upstream_task_id, attempt=job.record.submit_attempts or None)
    if job.record.upstream_task_id:
        svc.store.park(job, 0.0)  # accepted meanwhile: the schedule polls it now
        return "has_task"
    try:
        svc = svc.for_provider(job.record.provider)
        request = validate_request(job.request, job.record.provider)
    except InvalidRequestError as exc:
        fail_job(svc, job_id, "invalid_request", str(exc))
        return "failed"
    except ProviderNotConfigured as exc:
        return _not_configured_here(svc, job, exc)
    if _past_submit_deadline(svc, job):
        return _end_past_submit_deadline(svc, job)
    paused = _pause_state(svc, pause_read)
    gates: tuple[tuple[str, Callable[[], Wait | None]], ...] = (
        ("pause", lambda: pause_gate(svc, job, paused)),
        ("line", lambda: line_gate(svc, job)),
        ("spend", lambda: spend_gate(svc, job)),
    )
    for name, gate in gates:
        wait = gate()
        if wait is None:
            continue
        if wait.in_line:
            svc.lines.join(job, wait.seconds, **wait.fields)
        elif svc.store.park(job, wait.seconds, **wait.fields) and name == "pause":
            back_in_line_if_resumed(svc, job)
        return name
    send = _sender(svc, job, request)
    if isinstance(send, str):
        return send
    return _attempt(svc, job, send)


PauseRead = tuple[str, dict[Any, Any]]


def _begin(svc: Services, job_id: str, token: int) -> tuple[str, Job | None, PauseRead | None]:
    """Begin the step; the default key's pause (its key and fields) is read along, in the
    same round trip, when both live in one Redis."""
    if svc.pause.redis is not svc.store.redis:
        return (*svc.store.begin(job_id, token, svc.settings.lease_s), None)
    key = svc.pause.key
    status, job, fields = svc.store.begin_reading(job_id, token, svc.settings.lease_s, key)
    return status, job, (key, fields)


def _pause_state(svc: Services, read: PauseRead | None) -> PauseState | None:
    """The pause of the job's key: the one read along when it is that key's, else read now."""
    if read is not None and read[0] == svc.pause.key:
        return svc.pause.state_of(read[1])
    return svc.pause.state()


def _not_configured_here(svc: Services, job: Job, exc: ProviderNotConfigured) -> str:
    """A job this worker cannot send: it waits for a worker of the fleet that can (one
    sent a heartbeat lately), or fails at once when there is none."""
    if job.grant is not None:
        return_grant(svc.broker, job.grant)  # this worker has not that key: give it back
    now = svc.clock.now()
    if svc.broker.zcount(keys.provider_workers(job.record.provider), now - LIVE_WORKER_S, "+inf"):
        wait = PROVIDER_ELSEWHERE_WAIT_S * random.uniform(0.5, 1.5)
        svc.store.park(job, wait, **{GRANT_FIELD: None})
        return "provider_elsewhere"
    fail_job(svc, job.job_id, "provider_not_configured", str(exc))
    return "failed"


def _upload_files(svc: Services, job: Job, request: RemixRequest) -> dict[str, str] | str:
    """Upload the job's files not uploaded yet (or no longer fresh); ``{blob id: URL}``.

    Or what happened instead (the job failed, waits, or retries later). Each URL is
    remembered on the job as soon as it is known, so a later step (a retry of createTask,
    or of another file's upload) reuses it while the upstream still keeps the file.
    """
    uploads, urls = dict(job.uploads), {}
    for ref in request.files():
        done = uploads.get(ref.blob)
        if isinstance(done, dict) and _fresh(svc, done):
            urls[ref.blob] = str(done["url"])
            continue
        data = _read_blob(svc, job, ref)
        if isinstance(data, str):
            return data
        try:
            url = svc.uploader().upload(data, ref.name, ref.content_type)
        except UpstreamError as exc:
            svc.metrics.count(f"upload_total:{exc.fail_code}")
            return _after_unsent_error(svc, job, exc, "upload")
        svc.metrics.count("upload_total:200")
        uploads[ref.blob] = {"url": url, "uploaded_at": svc.clock.now()}
        urls[ref.blob] = url
        remembered: dict[str, Any] = {UPLOADS_FIELD: uploads}
        svc.store.update(job.job_id, token=job.token, **remembered)
    return urls


def _read_blob(svc: Services, job: Job, ref: BlobRef) -> bytes | str:
    """A source image's bytes, read from the blob store once per step; or what happened
    instead: a blob that is gone fails the job, a store that is away retries it later."""
    try:
        return svc.blobs.get(ref)
    except BlobMissing as exc:
        return _fail_unsent(svc, job, "image_missing", str(exc))
    except BlobStoreError as exc:  # the store is away: tried again like a network error
        return _after_unsent_error(svc, job, NetworkError(str(exc), ambiguous=False), "image")


def _fresh(svc: Services, upload: dict[str, Any]) -> bool:
    """Whether an uploaded file will outlive the task about to use it."""
    at = upload.get("uploaded_at")
    age = svc.clock.now() - at if isinstance(at, int | float) else math.inf
    return age < UPLOAD_LIFETIME_S - UPLOAD_REUSE_MARGIN_S


def _after_unsent_error(svc: Services, job: Job, exc: UpstreamError, what: str) -> str:
    """An error before createTask (``what``: an ``upload``, or the ``image`` store), by the
    same family table as createTask's; no attempt was open.

    Its answers are not counted by the pause's breaker: the File Upload API is another
    host, and a 455 there says nothing of createTask (a 402 still pauses the key: credits
    are the key's). An upload whose answer was lost is just sent again (a new file).
    """
    last_error = {
        "code": exc.fail_code,
        "msg": svc.redactor.redact(f"{what}: {exc.message or type(exc).__name__}"),
    }
    noted: dict[str, Any] = {LAST_ERROR_FIELD: last_error}
    svc.store.update(job.job_id, token=job.token, **noted)
    action = submit_action(exc)
    if action is Action.FAIL:
        return _fail_unsent(svc, job, exc.fail_code, last_error["msg"])
    if action is Action.HOLD_FOR_KEY:
        return _hold_for_key(svc, job, exc, None, last_error["msg"], what=what)
    return _retry_later(svc, job, exc, None, last_error, what=what)


def _fail_unsent(svc: Services, job: Job, fail_code: str, message: str) -> str:
    """Fail a job before any attempt was opened, giving back the spend it reserved."""
    refund_spend(svc, svc.store.get_internal(job.job_id, SPEND_FIELD))
    fail_job(svc, job.job_id, fail_code, message)
    return "failed"


Sender = Callable[[], RemixAnswer]


def _sender(svc: Services, job: Job, request: RemixRequest | IdeogramRemixRequest) -> Sender | str:
    """The one upstream request of an attempt, its files read (the relay's) or uploaded
    (kie's) first; or what happened instead (the job failed, waits, or retries later)."""
    if isinstance(request, IdeogramRemixRequest):
        ref = request.image_file
        image = _read_blob(svc, job, ref)
        if isinstance(image, str):
            return image
        return lambda: svc.relay_client().remix(request.image_request(), image, ref)
    uploaded = _upload_files(svc, job, request)
    if isinstance(uploaded, str):
        return uploaded
    task_input = request.upstream_input(uploaded)
    callback_url = svc.settings.callback_url_for(job.job_id)
    return lambda: RemixAnswer(task_id=svc.client().create_task(task_input, callback_url))


def _attempt(svc: Services, job: Job, send: Sender) -> str:
    attempt_id = svc.store.new_attempt_id()
    opened = svc.store.begin_attempt(
        job.job_id,
        attempt_id,
        svc.settings.attempt_settle_s,
        callback_wait_s=svc.settings.callback_wait_s if svc.profile.calls_back else 0.0,
        held_for=svc.api_key_id,
    )
    if opened.counted_unknown:
        _note_unknown(svc, job.job_id, "an earlier attempt never recorded its outcome")
    lost_before = opened.counted_unknown or job.record.unknown_outcomes > 0
    if opened.status == "ok" and not svc.profile.resends_after_lost_answer and lost_before:
        svc.store.end_attempt(job.job_id, attempt_id, unknown=False)
        return _fail_unknown_outcome(svc, job.job_id, "an earlier request's answer was lost")
    if opened.status == "accepted":
        svc.store.park(job, 0.0)
        return "has_task"
    if opened.status in ("open", "await_callback"):
        # Another attempt may be in flight, or the upstream may still call back with the
        # task a lost attempt created: the job waits instead of paying again.
        wait = opened.settles_in + random.uniform(0, SETTLE_JITTER_S)
        svc.store.park(job, wait, **{GRANT_FIELD: None})
        return "attempt_open" if opened.status == "open" else "await_callback"
    if opened.status != "ok":
        return opened.status
    if not use_send_moment(svc, job):
        # Nothing was sent: close the attempt as if it had never been opened.
        svc.store.end_attempt(
            job.job_id, attempt_id, unknown=False, submit_attempts=job.record.submit_attempts
        )
        refund_spend(svc, opened.spend)
        back_in_line(svc, job)
        return "budget"
    note(attempt=job.record.submit_attempts + 1)
    started = time.monotonic()
    try:
        answer = send()
    except UpstreamError as exc:
        note(upstream_code=exc.fail_code)
        _count_request(svc, "create_task", exc.fail_code, started)
        return _after_error(svc, job, attempt_id, exc, spend=opened.spend)
    except BaseException:
        # Whatever happened, the request may have gone out: its outcome is unknown.
        svc.store.end_attempt(job.job_id, attempt_id, unknown=True)
        raise
    _count_request(svc, "create_task", "200", started)
    if answer.task_id is not None:
        note(upstream_task_id=answer.task_id, upstream_code="200")
        return record_acceptance(svc, job.job_id, attempt_id, answer.task_id)
    task_id = SYNC_TASK_PREFIX + attempt_id
    note(upstream_task_id=task_id, upstream_code="200")
    record_acceptance(svc, job.job_id, attempt_id, task_id, results=answer.result_urls)
    _retrying_redis(job.job_id, task_id)(
        finish_job, svc, job.job_id, JobState.SUCCEEDED, result_urls=answer.result_urls
    )
    return "succeeded"


def _fail_unknown_outcome(svc: Services, job_id: str, why: str) -> str:
    """The relay may have made (and charged) the images: the job is not sent again."""
    message = (
        f"{why}; the relay may have made and charged it, and nothing can tell, so it is "
        "not sent again: submit it again (with its image file) to have it made anew"
    )
    fail_job(svc, job_id, UNKNOWN_OUTCOME, message)
    return "failed"


def _count_request(svc: Services, kind: str, code: str, started: float) -> None:
    """Count an upstream request by its outcome, and its latency (best effort)."""
    elapsed = time.monotonic() - started
    svc.metrics.observe(f"{kind}_seconds", elapsed, counting=f"{kind}_total:{code}")


def _say_unrecorded(job_id: str, task_id: str) -> Any:
    """A tenacity hook that says, once, that an accepted task waits for Redis."""
    said: list[bool] = []

    def before_sleep(state: RetryCallState) -> None:
        if not said:
            said.append(True)
            logger.critical(
                "job %s: upstream task %s was accepted but Redis is unavailable; "
                "this worker keeps trying to record it",
                job_id,
                task_id,
            )

    return before_sleep


def _retrying_redis(job_id: str, task_id: str, reraise: bool = True) -> Retrying:
    """Tries a write again through a Redis outage for up to :data:`RECORD_PATIENCE_S`."""
    return Retrying(
        # Any Redis error: an outage, a failover's read-only replica, a full memory.
        retry=retry_if_exception_type(redis.RedisError),
        stop=stop_after_delay(RECORD_PATIENCE_S),
        wait=wait_exponential(multiplier=0.2, max=RECORD_RETRY_WAIT_S),
        before_sleep=_say_unrecorded(job_id, task_id),
        reraise=reraise,
    )


def _accept(
    svc: Services, job_id: str, attempt_id: str, task_id: str, results: list[str] | None
) -> str:
    if results:  # kept first, so that a poll of the sync task finishes the job with them
        fields: dict[str, Any] = {RELAY_RESULTS_FIELD: results}
        svc.store.update(job_id, **fields)
    first_poll = first_poll_s(svc.settings, callbacks=svc.profile.calls_back)
    wait_ms = svc.settings.remix_accept_wait_ms
    if not wait_ms:
        return svc.store.accept(job_id, attempt_id, task_id, first_poll)
    outcome, replicas = svc.store.accept_replicated(
        job_id, attempt_id, task_id, first_poll, wait_ms
    )
    if replicas < 1:
        svc.metrics.incr("accepts_unreplicated_total")
        logger.warning(
            "job %s: no Redis replica acknowledged upstream task %s within %d ms; a failover "
            "now may lose its record",
            job_id,
            task_id,
            wait_ms,
            extra=job_fields(job_id, upstream_task_id=task_id),
        )
    return outcome


def record_acceptance(
    svc: Services, job_id: str, attempt_id: str, task_id: str, results: list[str] | None = None
) -> str:
    """Write the accepted task id, trying again through a Redis outage of any length.

    Only this process knows the task id (a retry message would need the broker, which is
    usually the very Redis that is down), so it keeps trying for up to
    :data:`RECORD_PATIENCE_S`, and raises :class:`AcceptedButUnrecorded` after that.
    ``results``: the images a relay answered at once, kept with the acceptance.
    """
    logger.info(
        "job %s submitted: createTask accepted as upstream task %s",
        job_id,
        task_id,
        extra=job_fields(job_id, upstream_task_id=task_id, state=JobState.SUBMITTED.value),
    )
    retrying = _retrying_redis(job_id, task_id, reraise=False)
    try:
        outcome = retrying(_accept, svc, job_id, attempt_id, task_id, results)
    except Exception as exc:
        raise AcceptedButUnrecorded(job_id, attempt_id, task_id) from exc
    svc.pause.note_success(svc.metrics)
    if outcome in ("accepted_after_unknown", "extra"):
        svc.metrics.incr("possibly_paid_twice_total")
        logger.warning(
            "job %s: upstream task %s accepted after an attempt of unknown outcome: "
            "the job may have been charged twice",
            job_id,
            task_id,
        )
    elif outcome == "missing":
        logger.error("job %s: record gone; upstream task %s is not tracked", job_id, task_id)
    return "accepted"


def _answer_kind(exc: UpstreamError) -> str:
    """How the pause's breaker counts an answer: ``455``, ``429`` or ``other``."""
    if isinstance(exc, MaintenanceError | RateLimitedError):
        return exc.code
    return "other"


def _after_error(
    svc: Services,
    job: Job,
    attempt_id: str,
    exc: UpstreamError,
    spend: dict[str, Any] | None = None,
) -> str:
    """Close the attempt and act on the error's family (the one decision table).

    A definite refusal gives the attempt's spend reservation back; an answer that may
    hide an accepted task (``exc.ambiguous``) keeps it: it may have been charged.
    """
    if not exc.ambiguous:
        refund_spend(svc, spend)
    recent = _note_answer(svc, _answer_kind(exc))
    last_error = {
        "code": exc.fail_code,
        "msg": svc.redactor.redact(exc.message or type(exc).__name__),
    }
    closed = svc.store.end_attempt(
        job.job_id, attempt_id, unknown=exc.ambiguous, **{LAST_ERROR_FIELD: last_error}
    )
    if not closed:
        # Someone else closed the attempt: a callback adopted the task it created. The
        # job has its task now, and this answer must not end it.
        svc.store.park(job, 0.0)
        logger.warning("job %s: createTask %s after its task was adopted", job.job_id, exc)
        return "adopted_meanwhile"
    if exc.ambiguous:
        _note_unknown(svc, job.job_id, f"createTask {exc}")
        if not svc.profile.resends_after_lost_answer:
            return _fail_unknown_outcome(svc, job.job_id, f"remix request: {last_error['msg']}")
    action = submit_action(exc)
    if action is Action.FAIL:
        fail_job(svc, job.job_id, exc.fail_code, last_error["msg"])
        return "failed"
    if action is Action.HOLD_FOR_KEY:
        return _hold_for_key(svc, job, exc, recent, last_error["msg"])
    return _retry_later(svc, job, exc, recent, last_error)


def _hold_for_key(
    svc: Services,
    job: Job,
    exc: UpstreamError,
    recent: RecentAnswers | None,
    message: str,
    what: str = "createTask",
) -> str:
    """A whole-key answer: pause the key when it is more than a stray; the job waits.

    A job refused with 402 again while the key has credits is refused for itself (it costs
    more than the balance): it waits alone, with a long growing backoff, rather than pause
    the fleet again; its submit deadline ends it with 402 if it never fits.
    """
    fields: dict[str, Any] = {GRANT_FIELD: None}
    outcome = "held"
    if isinstance(exc, InsufficientCreditsError):
        if job.refused_402 and _key_has_credits(svc):
            outcome = "held_alone"
        else:
            trip_pause(svc, exc.code, message)
        fields[REFUSED_402_FIELD] = job.refused_402 + 1
    elif recent is not None and recent.maintenance_run:
        trip_pause(svc, exc.code, message)
    holds = (svc.store.increment(job.job_id, HOLDS_FIELD) or 1) - 1
    delay = key_hold_delay(holds, svc.settings, alone=outcome == "held_alone")
    svc.store.park(job, delay, **fields)
    logger.warning("job %s: %s %s; held %.1fs (no retry spent)", job.job_id, what, exc, delay)
    return outcome


def _key_has_credits(svc: Services) -> bool:
    """Whether the key has credits now (a 402 that repeats may be the job's own)."""
    if not svc.profile.has_balance:
        return False
    try:
        return svc.client().credit() > 0
    except UpstreamError:
        return False


def _retry_later(
    svc: Services,
    job: Job,
    exc: UpstreamError,
    recent: RecentAnswers | None,
    last_error: dict[str, str],
    what: str = "createTask",
) -> str:
    settings = svc.settings
    retries = svc.store.increment(job.job_id, RETRIES_FIELD) or 1
    svc.metrics.count("retries_total")
    if gives_up(retries, settings):
        attempts = job.record.submit_attempts + 1
        fail_job(
            svc,
            job.job_id,
            exc.fail_code,
            f"{last_error['msg']} (gave up after {attempts} attempts)",
        )
        return "failed"
    delay = submit_retry_delay(retries, settings, exc.retry_after)
    if isinstance(exc, RateLimitedError) and recent is not None:
        hold_after_rate_limited(svc, exc, recent)
    svc.store.park(job, delay, **{GRANT_FIELD: None})
    logger.warning(
        "job %s: %s %s (retry %d), again in %.1fs", job.job_id, what, exc, retries, delay
    )
    return "retry"


def _past_submit_deadline(svc: Services, job: Job) -> bool:
    return svc.clock.now() - job.record.created_at > svc.settings.remix_submit_deadline_s


def _end_past_submit_deadline(svc: Services, job: Job) -> str:
    """Fail a job never accepted in time; an attempt still in flight is waited for first."""
    if job.attempt is not None:
        settled = svc.store.begin_attempt(
            job.job_id, "", svc.settings.attempt_settle_s, settle_only=True
        )
        if settled.status == "open":
            svc.store.park(job, settled.settles_in + random.uniform(0, SETTLE_JITTER_S))
            return "attempt_open"
        if settled.status != "ok":
            return settled.status
        if settled.counted_unknown:
            _note_unknown(svc, job.job_id, "an attempt never recorded its outcome")
    refund_spend(svc, job.spend)  # reserved while waiting, never used by an attempt
    last = job.last_error or {}
    limit = svc.settings.remix_submit_deadline_s
    message = f"not accepted upstream within {limit:g}s"
    if last.get("msg"):
        message += f"; last error: {last['msg']}"
    fail_job(svc, job.job_id, str(last.get("code") or "submit_timeout"), message)
    return "failed"


def _note_answer(svc: Services, kind: str) -> RecentAnswers | None:
    """Count a createTask answer for the breakers; a Redis error here must not cost a job."""
    try:
        return svc.pause.note_answer(kind)
    except REDIS_ERRORS:
        logger.warning("could not count a createTask answer (Redis unavailable)")
        return None


def _note_unknown(svc: Services, job_id: str, why: str) -> None:
    svc.metrics.incr("unknown_outcomes_total")
    logger.warning("job %s: createTask outcome unknown (%s)", job_id, why)
