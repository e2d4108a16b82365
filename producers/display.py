"""How the ``remixq`` command and the demo show jobs: records as JSON, progress, tables."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from producers.api import get_job
from worker.models import JobRecord, JobState

#: Pause between two reads of the records of the jobs being watched.
WATCH_INTERVAL_S = 0.5


class BatchLine(Protocol):
    """What the batch table needs of a request of a batch file."""

    @property
    def line(self) -> int: ...


def record_json(record: JobRecord, indent: int | None = 2) -> str:
    """The public record as JSON text.

    :param record: the job record.
    :param indent: JSON indentation; None for one line.
    """
    return json.dumps(record.model_dump(mode="json"), indent=indent)


def job_seconds(record: JobRecord) -> float | None:
    """Seconds from enqueueing to the end of a finished job (None while it runs).

    :param record: the job record.
    """
    if record.finished_at is None:
        return None
    return record.finished_at - record.created_at


def _state_counts(records: Iterable[JobRecord | None]) -> str:
    counts = Counter("missing" if r is None else r.state.value for r in records)
    return " · ".join(f"{state} {count}" for state, count in sorted(counts.items()))


def watch_jobs(
    job_ids: Sequence[str], timeout: float, console: Console
) -> dict[str, JobRecord | None]:
    """Show a progress bar of finished jobs until all finish or ``timeout`` passes.

    :param job_ids: the jobs to watch.
    :param timeout: seconds to wait at most.
    :param console: where the progress bar is drawn.
    :returns: the last record read of every job (None for a job that does not exist).
    """
    records: dict[str, JobRecord | None] = dict.fromkeys(job_ids)
    pending = list(records)
    deadline = time.monotonic() + timeout
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("waiting", total=len(records))
        while True:
            for job_id in pending:
                records[job_id] = get_job(job_id)
            pending = [j for j in pending if (r := records[j]) is not None and not r.finished]
            description = _state_counts(records.values())
            progress.update(bar, completed=len(records) - len(pending), description=description)
            if not pending or time.monotonic() >= deadline:
                return records
            time.sleep(WATCH_INTERVAL_S)


def succeeded(record: JobRecord | None) -> bool:
    return record is not None and record.state is JobState.SUCCEEDED


def fail_text(record: JobRecord) -> str:
    if record.fail_code is None:
        return ""
    return f"{record.fail_code}: {record.fail_msg}" if record.fail_msg else record.fail_code


def batch_table(
    items: Sequence[BatchLine], job_ids: Sequence[str], records: dict[str, JobRecord | None]
) -> Table:
    """The summary of a batch: one row per request.

    :param items: the batch's requests, in file order.
    :param job_ids: the job id of each request (the same id for a repeated idempotency key).
    :param records: job id to last record.
    """
    table = Table(title="remixq batch")
    table.add_column("line", justify="right")
    table.add_column("job id", no_wrap=True)
    for name in ("state", "fail", "seconds", "result URLs"):
        table.add_column(name, overflow="fold")
    for item, job_id in zip(items, job_ids, strict=True):
        record = records.get(job_id)
        if record is None:
            table.add_row(str(item.line), job_id, "missing", "", "", "")
            continue
        seconds = job_seconds(record)
        table.add_row(
            str(item.line),
            job_id,
            record.state.value,
            fail_text(record),
            "" if seconds is None else f"{seconds:.1f}",
            "\n".join(record.result_urls),
        )
    return table
