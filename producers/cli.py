"""The ``remixq`` command: submit jobs, read their records, run the sandbox and the demo.

Exit codes: 0 done; 1 a job failed (with ``--wait``), a job was skipped by ``retry``, or
Redis could not be reached; 2 bad input (an unknown job id for ``status``, ``cancel`` and
``retry`` included, and a tenant with as many jobs waiting as ``REMIX_TENANT_MAX_WAITING``
allows). Every error is one line on stderr (``error: ...``), never a traceback. The CLI
is a trusted caller: ``--tenant`` names the tenant (docs/tenants.md).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, NoReturn

import click
import kombu.exceptions
import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from producers.api import (
    JobNotCancellable,
    cancel_job,
    check_idempotency_key,
    check_job_options,
    check_notify_url,
    enqueue_remix,
    get_job,
)
from producers.display import (
    WATCH_INTERVAL_S,
    batch_table,
    fail_text,
    record_json,
    succeeded,
    watch_jobs,
)
from producers.fleet import fleet_status, pause_submissions, resume_submissions
from producers.retry import RetryOutcome, finished_since, parse_since, retry_one
from worker.app import services
from worker.fields import DEFAULT_PRIORITY, DEFAULT_TENANT, PRIORITIES
from worker.models import (
    PROVIDER,
    PROVIDERS,
    InvalidRequestError,
    JobRecord,
    JobState,
    refuse_file_fields,
    validate_request,
)
from worker.settings import ConfigurationError, get_settings
from worker.store.blobs import BlobStoreError, BlobStoreFull
from worker.store.jobs import QueueFull

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
DEFAULT_TIMEOUT_S = 900.0
#: Input fields that have their own option and cannot be given with ``--set``.
OPTION_FIELDS = {
    "prompt": "--prompt",
    "image_url": "--image-url",
    "reference_image_urls": "--reference-image-url",
    "image_file": "--image-file",
    "reference_image_files": "--reference-image-file",
    "idempotency_key": "--idempotency-key",
    "provider": "--provider",
    "notify_url": "--notify-url",
    "tenant": "--tenant",
    "priority": "--priority",
}
IDEMPOTENCY_FIELD = "idempotency_key"
NOTIFY_URL_FIELD = "notify_url"
PRIORITY_FIELD = "priority"
TENANT_FIELD = "tenant"
#: Commands imported only when used: name -> (module, attribute, the extra they need).
LAZY_COMMANDS = {
    "sandbox": ("sandbox.cli", "sandbox_command", "sandbox"),
    "demo": ("sandbox.demo", "demo_command", "sandbox"),
}


class PositiveSeconds(click.ParamType):
    """A finite number of seconds above zero (``nan`` and ``inf`` are refused)."""

    name = "seconds"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or seconds <= 0:
            self.fail(f"{value!r} is not a finite number of seconds above 0", param, ctx)
        return seconds


TIMEOUT_TYPE = PositiveSeconds()


class CliError(click.ClickException):
    """An error shown as one ``error: ...`` line on stderr (exit 1).

    :param message: the reason; newlines are folded into spaces.
    """

    exit_code = EXIT_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", file=file or sys.stderr)


class BadInput(CliError):
    """Bad input, shown like :class:`CliError` (exit 2)."""

    exit_code = EXIT_BAD_INPUT


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """Turn click's own errors (usage errors, bad parameters) into one-line ``CliError``s."""
    try:
        yield
    except CliError:
        raise
    except ConfigurationError as exc:
        raise BadInput(str(exc)) from None
    except click.UsageError as exc:
        message = exc.format_message().rstrip(".")
        hint = f". Try '{exc.ctx.command_path} --help'." if exc.ctx else "."
        raise BadInput(message + hint) from None
    except click.ClickException as exc:
        raise CliError(exc.format_message()) from None


class RemixqGroup(click.Group):
    """A command group whose every error is one line on stderr.

    Commands in :data:`LAZY_COMMANDS` are imported when used, so a producer-only install
    (without the ``sandbox`` extra's dependencies) runs every other command, and shows the
    help of every one.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in LAZY_COMMANDS:
            return super().get_command(ctx, cmd_name)
        module_name, attribute, extra = LAZY_COMMANDS[cmd_name]
        try:
            command: click.Command = getattr(importlib.import_module(module_name), attribute)
        except ImportError as exc:
            return missing_extra_command(cmd_name, extra, exc.name)
        return command

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _one_line_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_errors():
            return super().invoke(ctx)


def missing_extra_command(name: str, extra: str, missing: str | None) -> click.Command:
    """A stand-in for a lazy command whose extra is not installed.

    Its help (and the group's) works, so that ``remixq --help`` does on every install;
    running it fails with one line naming the extra.
    """
    reason = (
        f"remixq {name} needs the {extra} extra: pip install 'remixq[{extra}]' "
        f"({missing or 'a module'} is missing)"
    )

    def refuse() -> NoReturn:
        raise BadInput(reason)

    return click.Command(
        name,
        callback=refuse,
        help=reason,
        short_help=f"(needs the {extra} extra: pip install 'remixq[{extra}]')",
        # Whatever options were given, the answer is the missing extra.
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Report an unreachable or failing Redis as one line (exit 1)."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError) as exc:
        raise CliError(f"cannot reach Redis: {exc}") from None
    except redis.RedisError as exc:
        raise CliError(f"Redis error: {exc}") from None


# ------------------------------------------------------------------ input parsing


def parse_assignment(text: str) -> tuple[str, Any]:
    """Split one ``--set`` value: ``"strength=0.5"`` -> ``("strength", 0.5)``.

    The value is read as JSON when it parses (numbers, ``true``/``false``, lists,
    quoted strings) and kept as the plain text otherwise.

    :param text: ``KEY=VALUE``.
    :raises BadInput: when there is no ``=`` or no key.
    """
    key, equals, raw = text.partition("=")
    key = key.strip()
    if not equals or not key:
        raise BadInput(f"invalid --set {text!r}: expected KEY=VALUE (e.g. strength=0.5)")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def parse_assignments(texts: Iterable[str]) -> dict[str, Any]:
    """The optional input fields given with ``--set``.

    :param texts: the ``KEY=VALUE`` strings, in order.
    :raises BadInput: for a malformed one, a repeated key or a field that has its own option.
    """
    fields: dict[str, Any] = {}
    for text in texts:
        key, value = parse_assignment(text)
        if key in OPTION_FIELDS:
            raise BadInput(f"invalid --set {key}: use {OPTION_FIELDS[key]}")
        if key in fields:
            raise BadInput(f"invalid --set {key}: given more than once")
        fields[key] = value
    return fields


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch file.

    :param line: its 1-based line number in the file.
    :param fields: the input fields, validated.
    :param idempotency_key: the line's ``idempotency_key``, if any.
    :param notify_url: the line's ``notify_url`` (its completion webhook), if any.
    :param priority: the line's ``priority`` (``normal`` when it has none).
    """

    line: int
    fields: dict[str, Any]
    idempotency_key: str | None
    notify_url: str | None = None
    priority: str = DEFAULT_PRIORITY


def parse_batch_line(line: int, raw: str | bytes) -> BatchItem:
    """Parse and validate one line of a batch file.

    :param line: the line number, for the item.
    :param raw: the line: a JSON object with ``enqueue_remix``'s keyword arguments.
    :raises ValueError: with the reason (one line) when the line is bad.
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte {exc.start + 1})") from None
    try:
        data = json.loads(text.strip())
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise ValueError("nested too deeply to be a request") from None
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object of enqueue_remix's keyword arguments")
    key = data.pop(IDEMPOTENCY_FIELD, None)
    notify_url = data.pop(NOTIFY_URL_FIELD, None)
    priority = data.pop(PRIORITY_FIELD, DEFAULT_PRIORITY)
    if TENANT_FIELD in data:
        raise ValueError("tenant: give it for the whole batch with --tenant")
    refuse_file_fields(data, "remixq submit --image-file (one job at a time)")
    validate_request(data)
    check_idempotency_key(key)
    check_job_options(DEFAULT_TENANT, priority)
    check_notify_url(notify_url, allow_private=get_settings().remix_notify_allow_private)
    return BatchItem(line, data, key, notify_url, priority)


def parse_batch(lines: Iterable[str | bytes]) -> list[BatchItem]:
    """Validate every non-blank line of a batch file.

    :param lines: the file's lines.
    :raises BatchError: naming every bad line, when any is bad.
    """
    items: list[BatchItem] = []
    errors: list[str] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            items.append(parse_batch_line(number, text))
        except (ValueError, RecursionError) as exc:
            reason = "nested too deeply to be a request" if isinstance(exc, RecursionError) else exc
            errors.append(f"line {number}: {reason}")
    if errors:
        raise BatchError(errors)
    return items


class BatchError(ValueError):
    """Bad lines in a batch file.

    :param errors: one reason per bad line, ``line N: ...``.
    """

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


def _exit(code: int) -> NoReturn:
    raise click.exceptions.Exit(code)


# ------------------------------------------------------------------ commands

TENANT_OPTION = click.option(
    "--tenant",
    default=DEFAULT_TENANT,
    show_default=True,
    help="Who the job is for ([A-Za-z0-9_.-]{1,64}): its idempotency keys, share of the "
    "key's budget and limit of waiting jobs are its own.",
)
PRIORITY_OPTION = click.option(
    "--priority",
    type=click.Choice(PRIORITIES),
    default=DEFAULT_PRIORITY,
    show_default=True,
    help="Between classes the key's send moments go strictly to the higher one.",
)


@click.group(cls=RemixqGroup, invoke_without_command=True)
@click.version_option(package_name="remixq", prog_name="remixq")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Enqueue image remix jobs for the remixq worker fleet and read their outcome.

    Exit codes: 0 done, 1 a job failed (with --wait) or Redis is unreachable, 2 bad input.
    """
    if ctx.invoked_subcommand is None:  # bare `remixq`: the help, as with --help
        click.echo(ctx.get_help())


@main.command()
@click.option("--prompt", required=True, help="What the remix should show (1..5000 characters).")
@click.option(
    "--provider",
    type=click.Choice(PROVIDERS),
    default=PROVIDER,
    show_default=True,
    help="The upstream: kie.ai, or the legacy remix relay (which takes an image file only).",
)
@click.option("--image-url", help="http(s) URL of the source image.")
@click.option(
    "--image-file",
    metavar="PATH",
    help="The source image as a local JPEG, PNG or WebP file (<= 10 MB), instead of --image-url.",
)
@click.option(
    "--reference-image-url",
    "reference_image_urls",
    multiple=True,
    help="http(s) URL of the character reference image (kie; repeatable; the first is used).",
)
@click.option(
    "--reference-image-file",
    "reference_image_files",
    multiple=True,
    metavar="PATH",
    help="A character reference image as a local file (repeatable; after the URLs).",
)
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="KEY=VALUE",
    help="Another input field, e.g. strength=0.5, expand_prompt=false, "
    'image_urls=["https://..."]; VALUE is read as JSON when it parses (repeatable).',
)
@click.option("--idempotency-key", help="The same key returns the same job and enqueues nothing.")
@click.option("--notify-url", help="http(s) URL the finished job's record is POSTed to.")
@TENANT_OPTION
@PRIORITY_OPTION
@click.option("--wait", is_flag=True, help="Wait until the job finishes; exit 1 if it failed.")
@click.option(
    "--timeout",
    type=TIMEOUT_TYPE,
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Seconds --wait waits at most.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the job record as JSON.")
def submit(
    prompt: str,
    provider: str,
    image_url: str | None,
    image_file: str | None,
    reference_image_urls: tuple[str, ...],
    reference_image_files: tuple[str, ...],
    assignments: tuple[str, ...],
    idempotency_key: str | None,
    notify_url: str | None,
    tenant: str,
    priority: str,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Validate and enqueue one remix job; print its id (or its record with --json).

    The source image is --image-url or --image-file; give at least one reference
    (--reference-image-url, --reference-image-file). Files are read and checked here.
    """
    fields = parse_assignments(assignments)
    _require_image_options(
        provider, image_url, image_file, reference_image_urls, reference_image_files
    )
    with redis_errors():
        try:
            job_id = enqueue_remix(
                prompt,
                image_url,
                list(reference_image_urls) or None,
                idempotency_key=idempotency_key,
                notify_url=notify_url,
                provider=provider,
                image_file=image_file,
                reference_image_files=list(reference_image_files) or None,
                tenant=tenant,
                priority=priority,
                **fields,
            )
        except (InvalidRequestError, QueueFull) as exc:
            raise BadInput(str(exc)) from None
        except (BlobStoreFull, BlobStoreError) as exc:
            raise CliError(str(exc)) from None
        if not as_json:
            click.echo(job_id)
        if wait:
            _wait_and_report(job_id, timeout, as_json)
        elif as_json:
            click.echo(record_json(_existing(job_id)))


def _require_image_options(
    provider: str,
    image_url: str | None,
    image_file: str | None,
    reference_image_urls: tuple[str, ...],
    reference_image_files: tuple[str, ...],
) -> None:
    """kie.ai jobs need one source image and a reference, each as a URL or a file; the
    relay's own checks (image file only) come from its request model."""
    if provider != PROVIDER:
        return
    if (image_url is None) == (image_file is None):
        raise BadInput("give exactly one of --image-url and --image-file")
    if not reference_image_urls and not reference_image_files:
        raise BadInput("give at least one --reference-image-url or --reference-image-file")


def _existing(job_id: str) -> JobRecord:
    record = get_job(job_id)
    if record is None:
        raise CliError(f"job {job_id} vanished from Redis (expired?)")
    return record


def _wait_and_report(job_id: str, timeout: float, as_json: bool) -> None:
    """Wait for one job, print its outcome and exit 1 unless it succeeded."""
    deadline = time.monotonic() + timeout
    record = _existing(job_id)
    while not record.finished and time.monotonic() < deadline:
        time.sleep(min(WATCH_INTERVAL_S, max(0.0, deadline - time.monotonic())))
        record = _existing(job_id)
    if as_json:
        click.echo(record_json(record))
    elif record.state is JobState.SUCCEEDED:
        for url in record.result_urls:
            click.echo(url)
    if not record.finished:
        raise CliError(f"job {job_id} still {record.state.value} after {timeout:g}s")
    if record.state is not JobState.SUCCEEDED:
        raise CliError(f"job {job_id} {record.state.value}: {fail_text(record)}")


@main.command()
@click.argument("job_id", required=False)
def status(job_id: str | None) -> None:
    """Print a job's record as JSON; without JOB_ID, the fleet view.

    The fleet view: queue depths, messages held by workers, jobs by state, jobs in
    flight upstream, and for each API key its budget and whether submissions are paused.
    """
    with redis_errors():
        if job_id is None:
            click.echo(json.dumps(fleet_status(), indent=2))
            return
        record = get_job(job_id)
    if record is None:
        raise BadInput(f"no job {job_id!r} (unknown, or expired)")
    click.echo(record_json(record))


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the cancelled job's record as JSON.")
def cancel(job_id: str, as_json: bool) -> None:
    """Cancel a job that was not sent upstream yet.

    Exit codes: 0 cancelled (or it was already), 1 it cannot be cancelled any more
    (accepted upstream, being sent, of unknown outcome, or finished), 2 no such job.
    """
    with redis_errors():
        try:
            record = cancel_job(job_id)
        except KeyError:
            raise BadInput(f"no job {job_id!r} (unknown, or expired)") from None
        except JobNotCancellable as exc:
            raise CliError(str(exc)) from None
    click.echo(record_json(record) if as_json else f"cancelled {job_id}")


#: States ``remixq retry --state`` may replay: the finished ones.
RETRY_STATES = [state.value for state in JobState if state.finished]


@main.command()
@click.argument("job_id", required=False)
@click.option(
    "--state",
    type=click.Choice(RETRY_STATES),
    help="Retry every job in this state that finished since --since (instead of JOB_ID).",
)
@click.option(
    "--since",
    help="With --state: a duration back from now (30m, 2h, 1d) or an "
    "ISO 8601 time (2026-11-29T10:00:00Z).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Also retry jobs accepted upstream or with a createTask of unknown outcome "
    "(they may be paid for again).",
)
def retry(job_id: str | None, state: str | None, since: str | None, force: bool) -> None:
    """Enqueue a new job with the request (and notify_url) of a finished one.

    The new record's retry_of names the old job; a job retried before answers its earlier
    retry. Skipped, unless --force: jobs accepted upstream and jobs with a createTask of
    unknown outcome; never retried: unfinished jobs. One line per job: `retried OLD as NEW`,
    `OLD was already retried as NEW` or `skipped OLD: why`.

    Exit codes: 0 every job retried (or already was), also when none matched; 1 some job
    skipped, or Redis unreachable; 2 bad input, or JOB_ID unknown.
    """
    outcomes = _retry_outcomes(job_id, state, since, force)
    if job_id is not None and outcomes[0].skipped and outcomes[0].skipped.reason == "missing":
        raise BadInput(f"no job {job_id!r} (unknown, or expired)")
    for outcome in outcomes:
        click.echo(outcome.line())
    if any(outcome.skipped is not None for outcome in outcomes):
        _exit(EXIT_FAILED)


def _retry_outcomes(
    job_id: str | None, state: str | None, since: str | None, force: bool
) -> list[RetryOutcome]:
    """Retry the one job named, or every job of ``state`` finished since ``since``."""
    if (job_id is None) == (state is None):
        raise BadInput("give either JOB_ID or --state STATE --since WHEN")
    if job_id is not None and since is not None:
        raise BadInput("--since goes with --state, not with JOB_ID")
    with redis_errors():
        if job_id is not None:
            return [retry_one(job_id, force)]
        if state is None or since is None:
            raise BadInput("--state needs --since (a duration such as 2h, or an ISO 8601 time)")
        try:
            moment = parse_since(since, services().clock.now())
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        records = finished_since(JobState(state), moment)
        outcomes = [retry_one(record.job_id, force, record) for record in records]
    if not outcomes:
        click.echo(f"no {state} job finished since {since}", err=True)
    return outcomes


@main.command()
@click.option("--message", default="paused by an operator", show_default=True)
def pause(message: str) -> None:
    """Hold every submission (jobs stay queued) until `remixq resume`."""
    with redis_errors():
        key_ids = pause_submissions(message)
    if not key_ids:
        raise CliError("no API key is known yet: start a worker (or set KIE_API_KEY) first")
    click.echo(f"paused submissions for key(s) {', '.join(key_ids)}")


@main.command()
def resume() -> None:
    """Clear any pause (an operator's, or one for 455/402), so submissions go on."""
    with redis_errors():
        key_ids = resume_submissions()
    click.echo(f"resumed key(s) {', '.join(key_ids)}" if key_ids else "nothing was paused")


@main.command("submit-batch")
@click.argument("file", type=click.File("rb"))
@click.option("--wait", is_flag=True, help="Wait for every job; exit 1 if any failed.")
@click.option(
    "--timeout",
    type=TIMEOUT_TYPE,
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Seconds --wait waits at most, for the whole batch.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one job record per line as JSON.")
@click.option(
    "--tenant",
    default=DEFAULT_TENANT,
    show_default=True,
    help="The tenant of every job of the batch (see remixq submit --tenant).",
)
def submit_batch(file: IO[bytes], wait: bool, timeout: float, as_json: bool, tenant: str) -> None:
    """Enqueue one job per line of FILE (a JSON object of enqueue_remix's keyword arguments,
    ``priority`` included; the tenant is --tenant's).

    Every line is validated first; if any is bad nothing is enqueued, nor when the tenant
    has no room for the batch's new jobs (REMIX_TENANT_MAX_WAITING). Prints the job ids in
    file order (with --wait a summary table; with --json the records).
    """
    try:
        check_job_options(tenant, DEFAULT_PRIORITY)
        items = parse_batch(file)
    except InvalidRequestError as exc:
        raise BadInput(str(exc)) from None
    except BatchError as exc:
        for reason in exc.errors:
            click.echo(f"error: {reason}", err=True)
        _exit(EXIT_BAD_INPUT)
    if not items:
        raise BadInput(f"{file.name} holds no requests")
    console = Console(stderr=True)
    with redis_errors():
        _check_room(items, tenant)
        job_ids = _enqueue_batch(items, tenant, console)
        if wait:
            records = watch_jobs(job_ids, timeout, console)
        else:
            records = {job_id: get_job(job_id) for job_id in job_ids} if as_json else {}
    _print_batch(items, job_ids, records, as_json=as_json, table=wait)
    if wait and not all(succeeded(record) for record in records.values()):
        _exit(EXIT_FAILED)


def _check_room(items: Sequence[BatchItem], tenant: str) -> None:
    """Refuse the batch before enqueueing any of it when the tenant may not have all of its
    new jobs waiting (lines whose idempotency key names a job already add none)."""
    store = services().store
    if store.max_waiting is None:
        return
    keyed = [item.idempotency_key for item in items if item.idempotency_key is not None]
    known = sum(owner is not None for owner in store.idempotency_owners(keyed, tenant))
    adding = len(items) - known
    waiting = sum(n for (name, _), n in store.waiting_counts().items() if name == tenant)
    if waiting + adding > store.max_waiting:
        raise BadInput(str(QueueFull(tenant, waiting, store.max_waiting, adding)))


def _enqueue_batch(items: Sequence[BatchItem], tenant: str, console: Console) -> list[str]:
    """Enqueue validated requests with a progress bar; returns their job ids in order.

    When the tenant's room runs out on the way (other producers enqueue too), the ids
    enqueued so far are printed, then the error (exit 2).
    """
    job_ids: list[str] = []
    columns = (TextColumn("enqueueing"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console) as progress:
        for item in progress.track(items):
            try:
                job_id = enqueue_remix(
                    idempotency_key=item.idempotency_key,
                    notify_url=item.notify_url,
                    tenant=tenant,
                    priority=item.priority,
                    **item.fields,
                )
            except QueueFull as exc:
                progress.stop()
                for done in job_ids:
                    click.echo(done)
                raise BadInput(
                    f"line {item.line}: {exc} ({len(job_ids)} earlier line(s) enqueued, "
                    "their job ids printed above)"
                ) from None
            job_ids.append(job_id)
    return job_ids


def _print_batch(
    items: Sequence[BatchItem],
    job_ids: Sequence[str],
    records: dict[str, JobRecord | None],
    *,
    as_json: bool,
    table: bool,
) -> None:
    """Print a batch's outcome: JSON lines, the summary table, or the job ids (file order)."""
    if as_json:
        for job_id in job_ids:
            record = records.get(job_id)
            click.echo(record_json(record, None) if record else json.dumps({"job_id": job_id}))
    elif table:
        Console().print(batch_table(items, job_ids, records))
    else:
        for job_id in job_ids:
            click.echo(job_id)
