"""Structured logs: the job fields on every line about a job, JSON or text, never a secret.

The unit tests drive the formatters and filters through a real ``logging`` handler; the
integration test runs a real worker with ``REMIX_LOG_JSON=1`` against the sandbox and
reads its log.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from producers import enqueue_remix, wait_for_job
from sandbox.control import SandboxControl
from tests.conftest import REMIX_INPUT, SECRET_API_KEY, StartWorkers, unique_prompt
from worker.logs import JsonFormatter, install_log_format, job_context, job_fields, note
from worker.models import JobState
from worker.redaction import REDACTED, Redactor, install_log_redaction

SECRET = "sk-live-0123456789abcdef"
JOB_TIMEOUT_S = 60


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    """A private logger with one stream handler (no propagation to the test's root)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"remixq.test.logs.{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield logger, stream, handler
    logger.removeHandler(handler)


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def _install(logger: logging.Logger, json_lines: bool) -> None:
    """As the worker does: the format first, then redaction (the order is the point)."""
    install_log_format(json_lines, [logger])
    install_log_redaction(Redactor([SECRET]), [logger])


def test_json_lines_carry_the_context_fields(captured: tuple) -> None:  # type: ignore[type-arg]
    logger, stream, _ = captured
    _install(logger, json_lines=True)
    with job_context("job-1"):
        logger.info("sending")
        note(upstream_task_id="task-9", attempt=2, upstream_code="200")
        logger.info("accepted")
    logger.info("about nothing")

    sending, accepted, other = (json.loads(line) for line in _lines(stream))
    assert sending["job_id"] == "job-1" and "upstream_task_id" not in sending
    assert accepted["upstream_task_id"] == "task-9"
    assert (accepted["attempt"], accepted["upstream_code"]) == (2, "200")
    assert accepted["message"] == "accepted" and accepted["level"] == "INFO"
    assert "job_id" not in other


def test_extra_fields_outside_a_context(captured: tuple) -> None:  # type: ignore[type-arg]
    logger, stream, _ = captured
    _install(logger, json_lines=True)
    logger.info("job %s queued", "job-2", extra=job_fields("job-2", state="queued"))
    (line,) = (json.loads(text) for text in _lines(stream))
    assert (line["job_id"], line["state"], line["message"]) == (
        "job-2",
        "queued",
        "job job-2 queued",
    )


def test_text_lines_keep_the_format_and_add_the_fields(captured: tuple) -> None:  # type: ignore[type-arg]
    logger, stream, _ = captured
    _install(logger, json_lines=False)
    with job_context("job-3", upstream_task_id="t-1"):
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("failed")
    first, *rest = _lines(stream)
    assert first == "ERROR failed [job_id=job-3 upstream_task_id=t-1]"
    assert any("RuntimeError: boom" in line for line in rest)


def test_a_secret_in_a_field_or_traceback_is_redacted(captured: tuple) -> None:  # type: ignore[type-arg]
    logger, stream, _ = captured
    _install(logger, json_lines=True)
    with job_context("job-4", upstream_code=f"bad {SECRET}"):
        try:
            raise ValueError(f"key {SECRET}")
        except ValueError:
            logger.exception("header %s", SECRET, extra={"upstream_task_id": SECRET})
    text = stream.getvalue()
    assert SECRET not in text and SECRET[:10] not in text
    (line,) = (json.loads(t) for t in _lines(stream))
    assert line["upstream_task_id"] == REDACTED
    assert line["upstream_code"] == f"bad {REDACTED}"
    assert REDACTED in line["exc"] and REDACTED in line["message"]


def test_installing_twice_changes_nothing(captured: tuple) -> None:  # type: ignore[type-arg]
    logger, _, handler = captured
    _install(logger, json_lines=True)
    filters, formatter = list(handler.filters), handler.formatter
    _install(logger, json_lines=True)
    assert handler.filters == filters and handler.formatter is formatter
    assert isinstance(formatter, JsonFormatter)


def test_celery_lines_about_a_submit_name_the_job(captured: tuple) -> None:  # type: ignore[type-arg]
    logger, stream, _ = captured
    _install(logger, json_lines=True)
    logger.info("Task %(name)s[%(id)s] received", {"name": "remix.submit", "id": "job-5"})
    logger.info("Task %(name)s[%(id)s] received", {"name": "remix.poll", "id": "batch"})
    submit, poll = (json.loads(t) for t in _lines(stream))
    assert submit["job_id"] == "job-5" and "job_id" not in poll


@pytest.mark.integration
def test_a_json_worker_log_follows_a_job(
    control: SandboxControl, start_workers: StartWorkers
) -> None:
    """Every line of a real worker's log that names the job is JSON with its fields."""
    (worker,) = start_workers(1, REMIX_LOG_JSON="1")
    # One 500 first, so a retry's lines are in the log too.
    control.configure(faults={500: 0.5}, fault_endpoints=["createTask"])
    job_id = enqueue_remix(prompt=unique_prompt("json-logs"), **REMIX_INPUT)  # type: ignore[arg-type]
    record = wait_for_job(job_id, timeout=JOB_TIMEOUT_S)
    assert record.state is JobState.SUCCEEDED, (record.fail_code, record.fail_msg)
    worker.stop()

    assert worker.log_path is not None
    text = worker.log_path.read_text()
    assert SECRET_API_KEY not in text and SECRET_API_KEY[-16:] not in text
    about_job = [line for line in text.splitlines() if job_id in line]
    assert about_job, text[-2000:]
    entries = [json.loads(line) for line in about_job]  # every one parses
    assert all(
        entry.get("job_id") == job_id or job_id in entry.get("job_ids", []) for entry in entries
    ), [entry for entry in entries if entry.get("job_id") != job_id]
    task_id = record.upstream_task_id
    found = next(i for i, e in enumerate(entries) if task_id and task_id in e["message"])
    ours = [e for e in entries[found:] if e["logger"].startswith("worker.")]
    assert ours and all(entry.get("upstream_task_id") == task_id for entry in ours)
    states = [entry["state"] for entry in entries if "state" in entry]
    # One line per state change (a poll may miss "running" when it is short).
    assert states[0] == "submitted" and states[-1] == "succeeded", states
    assert len(states) == len(set(states)) and set(states) <= {"submitted", "running", "succeeded"}
