"""What a task reports to Flower about the jobs its step ended.

A step that fails a job has itself worked, so without this Flower would show the task as
a success. :func:`worker.policies.outcome.finish_job` records each outcome here
(:func:`note_outcome`) while a task runs (:func:`recording_outcomes`), and the task then
raises :class:`JobsFailed` when its step failed a job: Flower shows a FAILURE naming each
job and its ``fail_code``. See docs/design.md, "Processes" (Flower).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from worker.models import JobState

#: Characters of a job's fail message kept in a task's failure (Flower's exception column).
FAIL_MSG_PREVIEW_CHARS = 160


@dataclass(frozen=True)
class Outcome:
    """How one job ended, as the step that ended it saw it."""

    job_id: str
    state: JobState
    fail_code: str | None = None
    fail_msg: str = ""

    @property
    def failed(self) -> bool:
        return self.state is JobState.FAILED

    def describe(self) -> str:
        """One line for Flower: the job id, then its fail code, so either can be searched."""
        if not self.failed:
            return f"job {self.job_id} {self.state.value}"
        msg = self.fail_msg
        if len(msg) > FAIL_MSG_PREVIEW_CHARS:
            msg = msg[:FAIL_MSG_PREVIEW_CHARS] + "…"
        return f"job {self.job_id} failed: {self.fail_code}" + (f" ({msg})" if msg else "")


class JobsFailed(Exception):
    """Raised by a task whose step failed one or more jobs, so Flower shows it as FAILURE.

    Its message names each job and its ``fail_code``. It is raised after the jobs were
    recorded, is listed in the tasks' ``throws`` (logged in one line, no traceback) and
    is never retried: the message is acknowledged like that of any finished task.
    """

    def __init__(self, message: str, job_ids: Sequence[str] = ()) -> None:
        # Built from its message alone, as pickle and Celery rebuild it (``cls(*args)``):
        # otherwise Celery wraps it as unpickleable and logs it as an unexpected error.
        self.job_ids = list(job_ids)
        super().__init__(message)

    @classmethod
    def of(cls, outcomes: list[Outcome]) -> JobsFailed:
        """The failure naming each failed job and its ``fail_code``."""
        message = "; ".join(outcome.describe() for outcome in outcomes)
        return cls(message, [outcome.job_id for outcome in outcomes])


#: The outcomes recorded by the running task (None outside :func:`recording_outcomes`).
_recorded: ContextVar[list[Outcome] | None] = ContextVar("remixq_outcomes", default=None)


@contextlib.contextmanager
def recording_outcomes() -> Iterator[list[Outcome]]:
    """Collect the outcome of every job this task (thread or greenlet) ends.

    A context variable, so the threads and gevent pools keep each task's list apart.
    """
    found: list[Outcome] = []
    token = _recorded.set(found)
    try:
        yield found
    finally:
        _recorded.reset(token)


def note_outcome(job_id: str, state: JobState, fields: dict[str, Any]) -> None:
    """Called by ``finish_job`` for a job it ended; a no-op outside a recording task."""
    found = _recorded.get()
    if found is not None:
        fail_msg = str(fields.get("fail_msg") or "")
        found.append(Outcome(job_id, state, fields.get("fail_code"), fail_msg))


def failures(outcomes: list[Outcome]) -> list[Outcome]:
    return [outcome for outcome in outcomes if outcome.failed]
