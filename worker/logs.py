"""Structured logs: every line about a job carries the job's fields, as JSON or as text.

The fields (``job_id``, ``upstream_task_id``, ``attempt``, ``upstream_code``) become
attributes of each ``LogRecord``: a step runs inside :func:`job_context`, whose fields
:class:`JobFieldsFilter` copies onto every record logged meanwhile (by any module), and
code outside a step passes ``extra=job_fields(...)``. :class:`JsonFormatter` writes one
JSON object a line (``REMIX_LOG_JSON=1``), :class:`TextFieldsFormatter` appends
``key=value`` pairs. The fields filter goes *first* on each handler, so the redacting one
after it sees the fields too. For operators: docs/operations.md, "Logs".
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any

#: The job fields, in the order they are shown.
JOB_FIELDS = ("job_id", "upstream_task_id", "attempt", "upstream_code")
#: Further fields a line may carry: ``state`` on the one line per state change, ``job_ids``
#: on celery's lines about a poll of several jobs.
EXTRA_FIELDS = ("state", "job_ids")
#: The celery task whose task id is the job id (see :mod:`worker.store.publisher`).
_TASK_NAMED_BY_JOB = "remix.submit"

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "remixq_job_fields", default=None
)


def job_fields(job_id: str, **fields: Any) -> dict[str, Any]:
    """The ``extra`` of a log call about a job outside :func:`job_context`."""
    return {"job_id": job_id, **{k: v for k, v in fields.items() if v is not None}}


@contextlib.contextmanager
def job_context(job_id: str, **fields: Any) -> Iterator[None]:
    """Every line logged inside (in this thread or task) carries the job's fields."""
    token = _context.set(job_fields(job_id, **fields))
    try:
        yield
    finally:
        _context.reset(token)


def note(**fields: Any) -> None:
    """Add to the current job's fields (its upstream task id once known, an answer's code)."""
    current = _context.get()
    if current is not None:
        current.update({k: v for k, v in fields.items() if v is not None})


def _task_jobs(kwargs: Any) -> list[str]:
    """The job ids a pipeline task's keyword arguments name (a poll names a batch)."""
    if not isinstance(kwargs, dict):
        return []
    if isinstance(kwargs.get("job_id"), str):
        return [kwargs["job_id"]]
    batch = kwargs.get("jobs")
    if isinstance(batch, list):
        return [str(job[0]) for job in batch if isinstance(job, list | tuple) and job]
    return []


_task_tokens: dict[str, contextvars.Token[dict[str, Any] | None]] = {}


def enter_task(task_id: str | None = None, kwargs: Any = None, **_: Any) -> None:
    """``task_prerun``: celery's own lines about the task (its result included) name its jobs.

    The task's steps set their own job context inside; this one covers what celery logs
    around them, which the steps' contexts have left by then.
    """
    jobs = _task_jobs(kwargs)
    if task_id is None or not jobs:
        return
    fields = job_fields(jobs[0]) if len(jobs) == 1 else {"job_ids": jobs}
    _task_tokens[task_id] = _context.set(fields)


def leave_task(task_id: str | None = None, **_: Any) -> None:
    """``task_postrun`` (sent after celery's success or failure line): the task's jobs end."""
    token = _task_tokens.pop(task_id or "", None)
    if token is not None:
        with contextlib.suppress(ValueError):  # set in another context: nothing to undo
            _context.reset(token)


class JobFieldsFilter(logging.Filter):
    """Copies the current job's fields onto a record, unless its ``extra`` set them.

    Celery's own lines about a ``remix.submit`` task (received, succeeded) name the task
    by its id, which is the job id: they get ``job_id`` too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        fields = dict(_context.get() or {})
        args = record.args
        if isinstance(args, dict) and args.get("name") == _TASK_NAMED_BY_JOB and "id" in args:
            fields.setdefault("job_id", str(args["id"]))
        for name, value in fields.items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


def present_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The job fields (and extras) a record carries, in display order."""
    names = (*JOB_FIELDS, *EXTRA_FIELDS)
    values = ((name, getattr(record, name, None)) for name in names)
    return {name: value for name, value in values if value is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, process, message, the job fields,
    and the traceback (already redacted by the filter in front) as ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
            **present_fields(record),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFieldsFormatter(logging.Formatter):
    """The handler's own format, with ``key=value`` job fields after the message line."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter(logging.BASIC_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        fields = present_fields(record)
        if not fields:
            return text
        suffix = " ".join(f"{name}={value}" for name, value in fields.items())
        first, newline, rest = text.partition("\n")
        return f"{first} [{suffix}]{newline}{rest}"


def install_log_format(json_lines: bool, loggers: Iterable[logging.Logger] = ()) -> None:
    """Give every handler of the root and ``loggers`` the job fields and the chosen format.

    Idempotent (celery sets logging up again in each pool process). The fields filter goes
    first, so that the redacting filter installed after it sees the fields.
    """
    for logger in (logging.getLogger(), *loggers):
        for handler in logger.handlers:
            _install_on(handler, json_lines)


def _install_on(handler: logging.Handler, json_lines: bool) -> None:
    if not any(isinstance(f, JobFieldsFilter) for f in handler.filters):
        handler.filters.insert(0, JobFieldsFilter())
    current = handler.formatter
    if isinstance(current, JsonFormatter | TextFieldsFormatter):
        return
    handler.setFormatter(JsonFormatter() if json_lines else TextFieldsFormatter(current))
