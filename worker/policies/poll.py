"""The poll policy: one step of a job that has an upstream task.

The step asks the upstream once (recordInfo, or the relay's status endpoint) and either
finishes the job with its answer or parks it until its next poll
(:mod:`worker.policies.poll_schedule`). No error of the poll fails a paid job: it is
polled again until ``REMIX_DEADLINE_S``, and the poll due at the deadline asks once more.
A relay job whose images came with its acceptance finishes with them without asking.
See docs/design.md, "Error families" and "createTask attempts".
"""

from __future__ import annotations

import logging
import time

import redis

from worker.logs import job_context, job_fields, note
from worker.models import JobState
from worker.policies.outcome import fail_job, finish_job
from worker.policies.poll_schedule import next_poll_delay
from worker.policies.retry import poll_error_delay
from worker.services import Services
from worker.store.jobs import LAST_ERROR_FIELD, Job
from worker.upstreams.errors import UpstreamError
from worker.upstreams.kie import TaskInfo
from worker.upstreams.providers import ProviderNotConfigured

logger = logging.getLogger("worker.poll")


class UnexpectedError(UpstreamError):
    """An exception no upstream answer explains (a bug): the job is polled again."""

    code = "internal_error"


class NotConfiguredError(UpstreamError):
    """This worker has no settings for the job's provider: another worker may have."""

    code = "provider_not_configured"


#: The last poll is scheduled this long after the deadline, so it falls past it.
DEADLINE_EPSILON_S = 0.05
#: Upstream states that map onto job states while the job is still pending.
PENDING_JOB_STATES = {
    "waiting": JobState.SUBMITTED,
    "queuing": JobState.SUBMITTED,
    "generating": JobState.RUNNING,
}
_RANK = {JobState.QUEUED: 0, JobState.SUBMITTED: 1, JobState.RUNNING: 2}
#: What :func:`poll_step` answers when it asked recordInfo.
POLLED = frozenset({"succeeded", "failed", "pending", "poll_error", "timeout"})


def poll_step(
    svc: Services, job_id: str, token: int, begun: tuple[str, Job | None] | None = None
) -> str:
    """One step of the poll policy; returns what happened (for logs and tests).

    ``begun``: what :meth:`~worker.store.jobs.JobStore.begin` answered for this step, when
    the caller began it (a poll batch begins all its jobs in one round trip).
    Every line logged during the step carries the job's fields (:mod:`worker.logs`).
    """
    with job_context(job_id):
        if begun is None:
            begun = svc.store.begin(job_id, token, svc.settings.lease_s, poll=True)
        return _poll_step(svc, job_id, *begun)


def _poll_step(svc: Services, job_id: str, status: str, job: Job | None) -> str:
    if job is None:
        return status
    task_id = job.record.upstream_task_id
    note(upstream_task_id=task_id, attempt=job.record.submit_attempts or None)
    if not task_id:
        svc.store.park(job, 0.0)  # not accepted yet: the schedule submits it
        return "no_task"
    if job.relay_results:
        # The relay answered with the images themselves (written with the acceptance):
        # there is nothing to ask it. A relay's own task id may look like ours.
        finish_job(svc, job_id, JobState.SUCCEEDED, result_urls=job.relay_results)
        return "succeeded"
    polls = job.record.polls  # counted by begin
    try:
        svc = svc.for_provider(job.record.provider)
    except ProviderNotConfigured as exc:
        return _after_error(svc, job, NotConfiguredError(str(exc)), _next_delay(svc, polls))
    next_delay = _next_delay(svc, polls)
    started = time.monotonic()
    try:
        info = svc.status_client().record_info(task_id)
        note(upstream_code="200")
        _count_request(svc, "200", started)
        return apply_task_info(svc, job, info, next_delay)
    except UpstreamError as exc:
        note(upstream_code=exc.fail_code)
        _count_request(svc, exc.fail_code, started)
        return _after_error(svc, job, exc, next_delay)
    except (redis.ConnectionError, redis.TimeoutError):
        raise  # the job comes back by its lease once Redis answers
    except Exception as exc:
        # A bug must neither fail a paid job nor keep it from its deadline.
        logger.exception("job %s: unexpected error while polling", job_id)
        return _after_error(svc, job, UnexpectedError(f"{type(exc).__name__}: {exc}"), next_delay)


def _next_delay(svc: Services, polls: int) -> float:
    return next_poll_delay(svc.settings, polls, callbacks=svc.profile.calls_back)


def _count_request(svc: Services, code: str, started: float) -> None:
    elapsed = time.monotonic() - started
    svc.metrics.observe("record_info_seconds", elapsed, counting=f"record_info_total:{code}")


def deadline_at(svc: Services, job: Job) -> float:
    record = job.record
    return (record.submitted_at or record.created_at) + svc.settings.remix_deadline_s


def finish_from_info(svc: Services, job_id: str, info: TaskInfo) -> str | None:
    """Finish a job on the upstream's final answer (a poll's or a callback's).

    Returns ``succeeded`` or ``failed``, or None when the answer is not final. A job that
    had already finished is left as it was (a late poll or a second callback).
    """
    if info.state == "success":
        finish_job(svc, job_id, JobState.SUCCEEDED, result_urls=info.result_urls)
        return "succeeded"
    if info.state == "fail":
        redact = svc.redactor.redact
        code = redact(info.fail_code or "fail")
        note(upstream_code=code)
        fail_job(svc, job_id, code, redact(info.fail_msg or "generation failed upstream"))
        return "failed"
    return None


def apply_task_info(svc: Services, job: Job, info: TaskInfo, next_delay: float) -> str:
    """Finish the job on a final answer; otherwise record its progress and park it."""
    finished = finish_from_info(svc, job.job_id, info)
    if finished is not None:
        return finished
    pending = PENDING_JOB_STATES.get(info.state)
    if pending is None:
        logger.warning("job %s: unknown upstream state %r, still polling", job.job_id, info.state)
    moved = pending if pending and _RANK[pending] > _RANK.get(job.record.state, 3) else None
    return _park_or_time_out(svc, job, next_delay, moved)


def _after_error(svc: Services, job: Job, exc: UpstreamError, next_delay: float) -> str:
    message = svc.redactor.redact(exc.message or type(exc).__name__)
    logger.warning("job %s: recordInfo %s: %s; polling again", job.job_id, exc.fail_code, message)
    delay = poll_error_delay(next_delay, exc.retry_after, svc.settings)
    last_error = {"code": exc.fail_code, "msg": message}
    return _park_or_time_out(svc, job, delay, None, last_error)


def _park_or_time_out(
    svc: Services,
    job: Job,
    delay: float,
    state: JobState | None,
    last_error: dict[str, str] | None = None,
) -> str:
    now = svc.clock.now()
    until_deadline = deadline_at(svc, job) - now
    if until_deadline <= 0:
        message = f"not finished upstream within {svc.settings.remix_deadline_s:g}s"
        last = last_error or job.last_error
        if last:
            message += f"; last recordInfo error: {last.get('code')}: {last.get('msg')}"
        fail_job(svc, job.job_id, "timeout", message)
        return "timeout"
    fields = {LAST_ERROR_FIELD: last_error} if last_error else {}
    parked = svc.store.park(job, min(delay, until_deadline + DEADLINE_EPSILON_S), state, **fields)
    if parked and state is not None:
        # The one line of this state change (the others: accept and finish_job).
        logger.info(
            "job %s %s", job.job_id, state.value, extra=job_fields(job.job_id, state=state.value)
        )
    return "pending" if last_error is None else "poll_error"
