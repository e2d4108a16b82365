"""The pipeline's Celery tasks: ``remix.submit``, ``remix.poll``, ``remix.notify`` and
``remix.archive``.

They are thin: decode the message, run one step of the policy (:mod:`worker.policies.submit`,
:mod:`worker.policies.poll`) and deal with infrastructure errors. A step that cannot reach
Redis gives up after the client's retries; the job is then sent again by the schedule
once its lease runs out, so no message needs to survive for the job to go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery import Task

from worker import keys
from worker.app import app, services
from worker.fields import DEFAULT_PRIORITY, DEFAULT_TENANT, check_priority, check_tenant
from worker.models import PROVIDER, PROVIDERS
from worker.policies.archive import archive_step
from worker.policies.notify import notify_step
from worker.policies.outcome import fail_job
from worker.policies.poll import POLLED, poll_step
from worker.policies.submit import RECORD_PATIENCE_S, AcceptedButUnrecorded, submit_step
from worker.services import Services
from worker.store.jobs import QueueFull
from worker.store.lines import backstop_s
from worker.store.publisher import ARCHIVE_TASK, NOTIFY_TASK, POLL_TASK, SUBMIT_TASK
from worker.task_outcomes import JobsFailed, Outcome, failures, recording_outcomes

logger = logging.getLogger("worker.tasks")

#: Redis unavailable or refusing writes: the step gives up and the schedule sends the job
#: again. Other Redis errors (a script error) are bugs.
REDIS_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
)
POLL_LATENESS_SAMPLES = 10_000
MAX_JOB_ID_CHARS = 200


@app.task(name=SUBMIT_TASK, bind=True, ignore_result=True, throws=(JobsFailed,))
def remix_submit(
    self: Task,
    *positional: Any,
    request: Any = None,
    job_id: Any = None,
    dispatch: Any = 0,
    provider: Any = PROVIDER,
    tenant: Any = DEFAULT_TENANT,
    priority: Any = DEFAULT_PRIORITY,
    **unexpected: Any,
) -> dict[str, str]:
    """One submit step of a job. ``request`` holds the createTask ``input`` fields.

    ``job_id`` defaults to this task's id, so producers in other languages may send
    ``remix.submit`` with only ``request``. ``dispatch`` is the schedule's token (0 for
    the first message). ``provider`` names the upstream (``kie`` or ``ideogram-remix``),
    ``tenant`` and ``priority`` the job's (any tenant name is taken: tenants are not a
    registry); they matter only for a first message that creates its record. A message
    that breaks these rules fails its job with ``invalid_request`` (under the task's id
    when its ``job_id`` is unusable); a tenant with as many jobs waiting as
    ``REMIX_TENANT_MAX_WAITING`` allows has its new job failed with ``queue_full``.

    Returns what the step did (Flower's result column); raises :class:`JobsFailed` when
    it failed the job, so Flower lists the job's row (its task id is the job id) as
    FAILURE with the job's ``fail_code``.
    """
    problem = message_problem(job_id, dispatch, unexpected, positional, provider)
    provider = provider if problem is None else PROVIDER
    problem = problem or job_problem(tenant, priority)
    job_id = job_id if is_usable_job_id(job_id) else self.request.id
    owner = Owner(
        provider,
        tenant if _valid(check_tenant, tenant) else DEFAULT_TENANT,
        priority if _valid(check_priority, priority) else DEFAULT_PRIORITY,
    )
    svc = services()
    with recording_outcomes() as outcomes, svc.metrics.batched():
        step = _submit(svc, job_id, request, dispatch, problem, owner)
    return reported({"job_id": job_id, "step": step}, outcomes)


@dataclass(frozen=True)
class Owner:
    """What a first message says of its job besides the request (checked)."""

    provider: str = PROVIDER
    tenant: str = DEFAULT_TENANT
    priority: str = DEFAULT_PRIORITY


def _submit(
    svc: Services,
    job_id: str,
    request: Any,
    dispatch: Any,
    problem: str | None,
    owner: Owner = Owner(),
) -> str:
    """Run the step and deal with infrastructure errors; returns what happened, in a word."""
    try:
        if problem is not None:
            _fail_malformed(svc, job_id, request, problem, owner)
            return "malformed"
        step = submit_step(svc, job_id, dispatch)
        if step == "missing" and dispatch == 0:
            # A producer that speaks the Celery protocol sent no record: keep its request.
            if not _create_foreign(svc, job_id, request, owner):
                return "queue_full"
            step = submit_step(svc, job_id, dispatch)
        return step
    except AcceptedButUnrecorded as exc:
        logger.critical(
            "job %s: upstream task %s was accepted but could not be recorded within %.0f s; "
            "record it by hand",
            job_id,
            exc.task_id,
            RECORD_PATIENCE_S,
        )
        return "accepted_unrecorded"
    except REDIS_ERRORS as exc:
        logger.warning("job %s: Redis unavailable (%s); the schedule sends it again", job_id, exc)
        return "redis_unavailable"
    except Exception as exc:
        logger.exception("job %s: unexpected error in a submit step", job_id)
        _fail_unsent_job(svc, job_id, exc)
        return "error"


def reported(summary: dict[str, str], outcomes: list[Outcome]) -> dict[str, str]:
    """``summary`` for Flower's result column, unless the step failed jobs: then raise.

    Called outside any ``except`` block, so the failure carries no chained exception (whose
    text Flower would show in the traceback).
    """
    failed = failures(outcomes)
    if failed:
        raise JobsFailed.of(failed)
    return summary


def is_usable_job_id(job_id: Any) -> bool:
    """A job id must be a short, printable string (it is part of Redis keys and URLs)."""
    return (
        isinstance(job_id, str)
        and 0 < len(job_id) <= MAX_JOB_ID_CHARS
        and job_id.isprintable()
        and not any(c.isspace() for c in job_id)
    )


def message_problem(
    job_id: Any,
    dispatch: Any,
    unexpected: dict[str, Any],
    positional: tuple[Any, ...] = (),
    provider: Any = PROVIDER,
) -> str | None:
    """What is wrong with a ``remix.submit`` message's arguments, in one line (None: fine)."""
    if positional:
        return "invalid request: send the request as the keyword argument request, not by position"
    if unexpected:
        return f"invalid request: unknown argument(s) {', '.join(sorted(unexpected))}"
    if job_id is not None and not is_usable_job_id(job_id):
        return (
            f"invalid request: job_id must be a string of 1 to {MAX_JOB_ID_CHARS} printable "
            "characters without spaces"
        )
    if isinstance(dispatch, bool) or not isinstance(dispatch, int) or dispatch < 0:
        return "invalid request: dispatch must be a whole number of at least 0"
    if not isinstance(provider, str) or provider not in PROVIDERS:
        return f"invalid request: provider: must be one of {', '.join(PROVIDERS)}"
    return None


def job_problem(tenant: Any, priority: Any) -> str | None:
    """What is wrong with a ``remix.submit`` message's tenant or priority (None: fine)."""
    for check, value in ((check_tenant, tenant), (check_priority, priority)):
        try:
            check(value)
        except ValueError as exc:
            return f"invalid request: {exc}"
    return None


def _valid(check: Callable[[Any], Any], value: Any) -> bool:
    try:
        check(value)
    except ValueError:
        return False
    return True


def _create(svc: Services, job_id: str, request: Any, owner: Owner, *, admit: bool) -> bool:
    """Write a first message's record (``admit=False``: whatever its tenant's waiting
    jobs, for a record failed at once); whether it was written."""
    return svc.store.create(
        job_id,
        request,
        due_in=backstop_s(svc.settings),
        provider=owner.provider,
        tenant=owner.tenant,
        priority=owner.priority,
        admit=admit,
    )[1]


def _create_foreign(svc: Services, job_id: str, request: Any, owner: Owner) -> bool:
    """Create the record of a first message that found none; False when its tenant had no
    room (the record is then written failed with ``queue_full``, for the producer to read)."""
    try:
        _create(svc, job_id, request, owner, admit=True)
    except QueueFull as exc:
        if _create(svc, job_id, request, owner, admit=False):
            fail_job(svc, job_id, "queue_full", str(exc))
        return False
    return True


def _fail_malformed(
    svc: Services, job_id: str, request: Any, problem: str, owner: Owner = Owner()
) -> None:
    """Fail the job a malformed message names, but never a job that existed before it."""
    if _create(svc, job_id, request, owner, admit=False):
        fail_job(svc, job_id, "invalid_request", problem)
    else:
        logger.warning("job %s: dropped a malformed message (%s)", job_id, problem)


def _fail_unsent_job(svc: Services, job_id: str, exc: Exception) -> None:
    """A bug would bring the job back forever: fail it, unless it may have been sent."""
    record = svc.store.get(job_id)
    if record is None or record.finished or record.upstream_task_id or record.attempt_started_at:
        return
    message = svc.redactor.redact(f"{type(exc).__name__}: {exc}")
    fail_job(svc, job_id, "internal_error", message)


@app.task(name=POLL_TASK, bind=True, ignore_result=True, throws=(JobsFailed,))
def remix_poll(self: Task, jobs: list[list[Any]]) -> dict[str, str]:
    """Poll each job of a batch once (recordInfo), then finish or park each.

    ``jobs`` holds ``[job_id, dispatch token, due time]`` triples. The batch stops
    starting new polls after ``KIE_REQUEST_DEADLINE_S``; the rest are made due again.
    Returns each job's step (Flower's result column); raises :class:`JobsFailed`, once
    the whole batch is done, when it failed any job.
    """
    svc = services()
    with recording_outcomes() as outcomes, svc.metrics.batched():
        steps = _poll_batch(svc, jobs)
    return reported(steps, outcomes)


def _poll_batch(svc: Services, jobs: list[list[Any]]) -> dict[str, str]:
    started = time.monotonic()
    late_by: list[float] = []
    steps: dict[str, str] = {}
    entries = _entries(jobs)
    try:
        # One round trip begins every step of the batch (a poll a deadline cuts still
        # counts as one in the record). Polls start until KIE_REQUEST_DEADLINE_S after
        # this, so each lease is that much longer: the last poll begun has a whole lease.
        begun = svc.store.begin_many(
            [(job_id, token) for job_id, token, _ in entries],
            svc.settings.lease_s + svc.settings.kie_request_deadline_s,
            poll=True,
        )
    except REDIS_ERRORS as exc:
        logger.warning("poll batch: Redis unavailable (%s); the schedule sends it again", exc)
        return steps
    for index, (job_id, token, due) in enumerate(entries):
        if time.monotonic() - started > svc.settings.kie_request_deadline_s:
            _due_again(svc, entries[index:])
            break
        late = None if due is None else svc.clock.now() - due
        try:
            steps[job_id] = step = poll_step(svc, job_id, token, begun[index])
            if step in POLLED and late is not None:
                late_by.append(late)
        except REDIS_ERRORS as exc:
            logger.warning("poll batch: Redis unavailable (%s); the schedule sends it again", exc)
            break
        except Exception:
            logger.exception("job %s: unexpected error in a poll step", job_id)
            steps[job_id] = "error"
    _record_lateness(svc, late_by)
    return steps


def _entries(jobs: Any) -> list[tuple[str, int, float | None]]:
    """The batch's ``(job id, token, due time)`` triples. An entry that is no triple is
    left out (a job it names comes back after its lease) and never costs the others; an
    unreadable token is one no job holds, an unreadable due time is not sampled."""
    entries: list[tuple[str, int, float | None]] = []
    malformed = 0
    for entry in jobs if isinstance(jobs, (list, tuple)) else ():
        if isinstance(entry, (list, tuple)) and len(entry) == 3:
            job_id, token, due = entry
            entries.append((str(job_id), _token(token), _due(due)))
        else:
            malformed += 1
    if malformed or not isinstance(jobs, (list, tuple)):
        logger.warning("poll batch: %d malformed entries left out", max(malformed, 1))
    return entries


def _token(value: Any) -> int:
    """A poll's dispatch token; one no job holds (its step is stale) when unreadable."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _due(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _due_again(svc: Services, entries: list[tuple[str, int, float | None]]) -> None:
    for job_id, token, _ in entries:
        svc.store.update(job_id, token=token, due_in=0.0)


def _record_lateness(svc: Services, late_by: list[float]) -> None:
    """Keep a sample of how late polls start after they were due (for the benchmark)."""
    svc.metrics.sample(keys.POLL_LATENESS, late_by, POLL_LATENESS_SAMPLES)


@app.task(name=NOTIFY_TASK, bind=True, ignore_result=True)
def remix_notify(
    self: Task, job_id: Any = "", dispatch: Any = 0, receiver: Any = "", **_: Any
) -> None:
    """Deliver one finished job's completion webhook (:func:`worker.policies.notify.notify_step`).

    Whatever goes wrong here, the webhook stays in the notify schedule and is sent again
    after its lease; nothing here touches a job's state or the submit and poll steps.
    """
    svc = services()
    try:
        notify_step(svc, str(job_id), int(dispatch), str(receiver))
    except REDIS_ERRORS as exc:
        logger.warning(
            "job %s: Redis unavailable during its webhook (%s); it is sent again after its lease",
            job_id,
            exc,
        )
    except Exception:
        logger.exception("job %s: unexpected error in a webhook delivery", job_id)


@app.task(name=ARCHIVE_TASK, bind=True, ignore_result=True)
def remix_archive(self: Task, job_id: Any = "", dispatch: Any = 0, **_: Any) -> str:
    """Archive one succeeded job's result images (:func:`worker.policies.archive.archive_step`).

    An error of the try itself is recorded by the step as a failed try; when Redis fails
    (or a bug outside the try), the entry stays in the archive schedule and is sent again
    after its lease. Nothing here touches a job's state or results.
    """
    svc = services()
    try:
        return archive_step(svc, str(job_id), int(dispatch))
    except REDIS_ERRORS as exc:
        logger.warning(
            "job %s: Redis unavailable while archiving (%s); it is sent again after its lease",
            job_id,
            exc,
        )
    except Exception:
        logger.exception("job %s: unexpected error while archiving", job_id)
    return "error"
