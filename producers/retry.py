"""Replaying finished jobs: ``remixq retry`` and :func:`retry_job`.

A retry enqueues a *new* job with the old one's request, ``notify_url``, tenant and
priority; its record
names the old one in ``retry_of``, which stays as it was. What is refused, and why, is
:data:`SKIP_REASONS` (an accepted job or one of unknown outcome unless forced). Each retry
carries the idempotency key ``remixq-retry:<old job id>``, so retrying a job twice
enqueues one new job. For operators: docs/operations.md, "Replaying failed jobs".
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass

from producers.api import JobOptions, check_notify_url, enqueue_validated
from worker.app import services
from worker.models import InvalidRequestError, JobRecord, JobState, validate_request
from worker.store.jobs import NOTIFY_URL_FIELD, REQUEST_FIELD, QueueFull

#: Idempotency key of the retry of a job: one retry per job, however often it is asked.
RETRY_KEY_PREFIX = "remixq-retry:"
#: Jobs read from a state's index per page.
PAGE_SIZE = 500
#: ``--since`` as a duration: ``90s``, ``30m``, ``2h``, ``7d`` (a bare number is seconds).
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

SKIP_REASONS = {
    "missing": "no such job (unknown, or expired)",
    "unfinished": "it has not finished yet (cancel it, or wait for it)",
    "accepted": "it was accepted upstream and paid for; --force retries it anyway",
    "unknown_outcome": (
        "a createTask's outcome is unknown (the upstream may have its task); "
        "--force retries it anyway"
    ),
    "no_request": "its request is not stored",
    "files": "its source images were files, deleted when it finished: submit it again",
    "invalid_request": "its request is no longer valid",
    "invalid_notify_url": "its notify_url is refused by the current settings",
    "queue_full": "its tenant has as many jobs waiting as REMIX_TENANT_MAX_WAITING allows",
}


class JobNotRetryable(Exception):
    """The job is not retried; ``reason`` is a key of :data:`SKIP_REASONS`."""

    def __init__(self, job_id: str, reason: str, detail: str = "") -> None:
        self.job_id = job_id
        self.reason = reason
        text = SKIP_REASONS[reason] + (f": {detail}" if detail else "")
        super().__init__(f"job {job_id} not retried: {text}")


@dataclass(frozen=True)
class RetryOutcome:
    """What ``remixq retry`` did with one job.

    ``new_job_id`` is set when a retry exists (``created`` False when an earlier retry
    of the job was found); otherwise ``skipped`` holds the reason.
    """

    job_id: str
    new_job_id: str | None = None
    created: bool = False
    skipped: JobNotRetryable | None = None

    def line(self) -> str:
        """The command's one line for this job."""
        if self.skipped is not None:
            return f"skipped {self.job_id}: {SKIP_REASONS[self.skipped.reason]}"
        if self.created:
            return f"retried {self.job_id} as {self.new_job_id}"
        return f"{self.job_id} was already retried as {self.new_job_id}"


def refusal(record: JobRecord, force: bool = False) -> str | None:
    """Why ``record``'s job may not be retried (a key of :data:`SKIP_REASONS`), or None.

    Pure, so the policy is tested without Redis. ``force`` overrides only the two refusals
    that are about money (a task upstream, or possibly one); an unfinished job is never
    retried, since it may still be sent itself.
    """
    if not record.finished:
        return "unfinished"
    if force:
        return None
    if record.upstream_task_id or record.extra_task_ids:
        return "accepted"
    if record.unknown_outcomes > 0:
        return "unknown_outcome"
    return None


def retry_job(job_id: str, force: bool = False) -> str:
    """Enqueue a new job with ``job_id``'s request and ``notify_url``; returns its id.

    The new record's ``retry_of`` is ``job_id``. A job retried before returns the earlier
    retry's id (nothing new is enqueued). Raises ``KeyError`` for an unknown job and
    :class:`JobNotRetryable` when it is refused (see the module's docstring).
    """
    outcome = retry_one(job_id, force)
    if outcome.skipped is not None:
        if outcome.skipped.reason == "missing":
            raise KeyError(f"no job {job_id!r}")
        raise outcome.skipped
    assert outcome.new_job_id is not None
    return outcome.new_job_id


def retry_one(job_id: str, force: bool = False, record: JobRecord | None = None) -> RetryOutcome:
    """Retry one job, answering a skip instead of raising (for the command's loop)."""
    try:
        new_job_id, created = _retry(job_id, force, record)
    except JobNotRetryable as exc:
        return RetryOutcome(job_id, skipped=exc)
    return RetryOutcome(job_id, new_job_id, created)


def _retry(job_id: str, force: bool, record: JobRecord | None) -> tuple[str, bool]:
    store = services().store
    record = record or store.get(job_id)
    if record is None:
        raise JobNotRetryable(job_id, "missing")
    reason = refusal(record, force)
    if reason is not None:
        raise JobNotRetryable(job_id, reason)
    raw = store.get_internal(job_id, REQUEST_FIELD)
    if raw is None:
        raise JobNotRetryable(job_id, "no_request")
    notify_url = store.get_internal(job_id, NOTIFY_URL_FIELD)
    try:
        request = validate_request(raw, record.provider)
    except InvalidRequestError as exc:
        raise JobNotRetryable(job_id, "invalid_request", str(exc)) from None
    if request.files():
        raise JobNotRetryable(job_id, "files")
    payload = request.upstream_input()
    try:
        check_notify_url(notify_url, allow_private=services().settings.remix_notify_allow_private)
    except InvalidRequestError as exc:
        raise JobNotRetryable(job_id, "invalid_notify_url", str(exc)) from None
    options = JobOptions(
        RETRY_KEY_PREFIX + job_id,
        notify_url,
        record.provider,
        record.tenant,
        record.priority,
        retry_of=job_id,
    )
    try:
        return enqueue_validated(payload, options)
    except QueueFull as exc:
        raise JobNotRetryable(job_id, "queue_full", str(exc)) from None


def finished_since(state: JobState, since: float) -> Iterator[JobRecord]:
    """The jobs in ``state`` that finished at or after ``since`` (epoch seconds).

    Reads the state's index a page at a time (:meth:`JobStore.list_by_state`), so memory
    stays bounded however many jobs there are; the index is ordered by creation, so every
    page is read and filtered by ``finished_at``.
    """
    store = services().store
    cursor: tuple[float, str] | None = None
    while True:
        records, cursor = store.list_by_state(state, PAGE_SIZE, cursor)
        for record in records:
            if record.finished_at is not None and record.finished_at >= since:
                yield record
        if cursor is None:
            return


def parse_since(text: str, now: float) -> float:
    """``--since`` as epoch seconds: a duration back from ``now`` or an ISO 8601 time.

    Durations: ``90s``, ``30m``, ``2h``, ``7d`` (a bare number is seconds). Times:
    ``2026-11-29T10:00:00Z`` or with an offset; a time without a zone is read as UTC.
    Raises ``ValueError`` with the reason.
    """
    match = _DURATION.match(text)
    if match:
        return now - float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    try:
        moment = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--since {text!r} is neither a duration (30m, 2h, 1d) nor an ISO 8601 time "
            "(2026-11-29T10:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()
