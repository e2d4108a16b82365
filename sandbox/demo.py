"""``remixq demo``: the whole pipeline on this machine, against the sandbox.

Starts a private ``redis-server`` on a free loopback port (or, without one installed,
uses database 15 of the server in ``REDIS_URL``), the sandbox on a free port with a few
random faults so that retries show, and one Celery worker; enqueues a handful of jobs
through ``enqueue_remix``, watches them finish, saves the result images and prints what
happened. Everything it started is stopped at the end, also on Ctrl-C or SIGTERM.

A Redis of its own keeps the demo apart from any fleet already running: another worker
on the same database would take the demo's jobs and send them to its own upstream.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click
import requests
from rich.console import Console
from rich.table import Table

from producers.api import enqueue_remix
from producers.cli import redis_errors
from producers.display import job_seconds, watch_jobs
from sandbox.config import DEFAULT_API_KEY
from sandbox.control import SandboxControl
from sandbox.launch import (
    LOOPBACK,
    LaunchError,
    ManagedProcess,
    ensure_redis,
    free_port,
    sigterm_as_interrupt,
    start_sandbox,
    start_worker,
)
from worker.app import configure
from worker.models import JobRecord, JobState
from worker.settings import get_settings

DEMO_DATABASE = 15
GENERATION_SECONDS = 4
SANDBOX_FAULTS = ("429=0.2", "500=0.05")
WORKER_CONCURRENCY = 4
WORKER_SETTINGS = {"REMIX_POLL_INITIAL_S": "1", "REMIX_POLL_MAX_S": "3"}
JOB_TIMEOUT_S = 180.0
DOWNLOAD_TIMEOUT_S = 10.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: The sandbox never fetches input images, so these only have to be well-formed URLs.
SOURCE_IMAGE = "https://example.com/remixq-demo/source.png"
REFERENCE_IMAGE = "https://example.com/remixq-demo/character.png"
STYLE_IMAGE = "https://example.com/remixq-demo/style.png"
#: Stands for the local source image the demo draws (``image_file`` jobs).
LOCAL_SOURCE = "<the demo's local source image>"
LOCAL_SOURCE_SIZE = (256, 256)
LOCAL_SOURCE_COLOUR = (70, 130, 180)
DEMO_JOBS: tuple[dict[str, Any], ...] = (
    {"prompt": "the character as a lighthouse keeper in a storm", "style": "FICTION"},
    {"prompt": "the character surfing a giant wave at dawn", "num_images": 2, "strength": 0.5},
    {
        "prompt": "the character in a neon-lit night market",
        "image_size": "landscape_16_9",
        "rendering_speed": "TURBO",
    },
    {
        "prompt": "the character as an astronaut on the moon",
        "seed": 42,
        "negative_prompt": "blurry, low contrast",
    },
    {
        "prompt": "a studio portrait of the character, soft light",
        "style": "REALISTIC",
        "expand_prompt": False,
        "image_size": "portrait_4_3",
    },
    {
        "prompt": "the character reading in a cosy library",
        "rendering_speed": "QUALITY",
        "image_urls": [STYLE_IMAGE],
    },
    # The source image as a local file: stored in the blob store, uploaded by the worker.
    {"prompt": "the character as a paper cut-out", "image_file": LOCAL_SOURCE},
    # The legacy remix relay, which takes the source image as a file only.
    {
        "prompt": "the character as a watercolour",
        "provider": "ideogram-remix",
        "image_file": LOCAL_SOURCE,
        "style_type": "ANIME",
        "aspect_ratio": "ASPECT_16_9",
    },
)


@dataclass
class Saved:
    """A result image and where it went.

    :param url: the result URL.
    :param path: the file it was saved to, or None when the download failed.
    :param error: why the download failed.
    """

    url: str
    path: Path | None = None
    error: str | None = None


#: Columns of the output when it goes to a file or a pipe.
WIDE_OUTPUT = 200


def demo_redis_url(redis_url: str, database: int = DEMO_DATABASE) -> str:
    """The URL of database ``database`` on the server of ``redis_url``.

    :param redis_url: a ``redis://`` or ``rediss://`` URL; other schemes are returned as is.
    :param database: the database number.
    """
    parts = urlsplit(redis_url)
    if parts.scheme not in ("redis", "rediss"):
        return redis_url
    return urlunsplit(parts._replace(path=f"/{database}"))


def choose_redis_url(redis_url: str | None) -> str:
    """The Redis the demo uses.

    :param redis_url: the one asked for, if any.
    :returns: ``redis_url`` when given; else a free loopback port for a private
        ``redis-server`` when one is installed; else :func:`demo_redis_url` of ``REDIS_URL``.
    """
    if redis_url:
        return redis_url
    if shutil.which("redis-server"):
        return f"redis://{LOOPBACK}:{free_port()}/0"
    return demo_redis_url(get_settings().redis_url)


def run_demo(redis_url: str | None, output_dir: str | Path) -> int:
    """Run the demo end to end.

    :param redis_url: the Redis to use; None to choose with :func:`choose_redis_url`.
    :param output_dir: where the result images are saved (created when missing).
    :returns: the exit status: 0 when every job succeeded and every image was saved, else 1.
    """
    # Wide enough for the results table even when the output is not a terminal.
    console = Console(width=None if sys.stdout.isatty() else WIDE_OUTPUT)
    url = choose_redis_url(redis_url)
    log_dir = Path(tempfile.mkdtemp(prefix="remixq-demo-"))
    console.print(f"[bold]remixq demo[/] - logs in {log_dir}")
    started: list[ManagedProcess] = []
    try:
        with sigterm_as_interrupt():
            return _run(console, url, log_dir, Path(output_dir), started)
    except LaunchError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 1
    finally:
        _stop_all(started, console)


def _run(
    console: Console, redis_url: str, log_dir: Path, output_dir: Path, started: list[ManagedProcess]
) -> int:
    """Start the processes (appending them to ``started``), run the jobs, report."""
    redis_server = _launch(started, lambda: _managed(ensure_redis(redis_url)))
    started_text = "started for the demo" if redis_server else "already running"
    console.print(f"Redis {shown_url(redis_url)} ({started_text})")
    _use_redis(redis_url)
    sandbox = _launch(
        started, lambda: start_sandbox(args=_sandbox_args(), log_path=log_dir / "sandbox.log")
    )
    sandbox_url = sandbox.url if sandbox and sandbox.url else ""
    console.print(f"sandbox on {sandbox_url} (faults {', '.join(SANDBOX_FAULTS)})")
    worker = _launch(
        started,
        lambda: start_worker(
            _worker_env(redis_url, sandbox_url),
            concurrency=WORKER_CONCURRENCY,
            log_path=log_dir / "worker.log",
        ),
    )
    console.print(f"worker {worker.name if worker else ''} ready")
    source = _draw_source_image(log_dir / "source.png")
    job_ids = [_enqueue(fields, source) for fields in DEMO_JOBS]
    console.print(f"enqueued {len(job_ids)} jobs (two with the local image {source})")
    records = watch_jobs(job_ids, JOB_TIMEOUT_S, console)
    saved = {job_id: _save_results(records[job_id], output_dir) for job_id in job_ids}
    console.print(_results_table(job_ids, records, saved))
    console.print(_sandbox_summary(sandbox_url))
    return 0 if _all_good(records, saved) else 1


def _managed(popen: subprocess.Popen[bytes] | None) -> ManagedProcess | None:
    return None if popen is None else ManagedProcess(popen)


def _launch(
    started: list[ManagedProcess], start: Callable[[], ManagedProcess | None]
) -> ManagedProcess | None:
    """Start a process and add it to ``started``; Ctrl-C meanwhile takes effect afterwards.

    A start function interrupted half way would leave its process running with nobody
    to stop it, so an interrupt that arrives during ``start`` is held until it returns.

    :param started: the processes to stop at the end.
    :param start: starts the process; None when there was nothing to start.
    :raises KeyboardInterrupt: when Ctrl-C or SIGTERM arrived while starting.
    """
    received: list[int] = []
    previous = {sig: signal.signal(sig, _holder(received)) for sig in STOP_SIGNALS}
    try:
        process = start()
        if process is not None:
            started.append(process)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt
    return process


def shown_url(url: str) -> str:
    """``url`` as it may be printed: a password becomes ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def _holder(received: list[int]) -> Callable[[int, FrameType | None], None]:
    """A signal handler that only notes the signal in ``received``."""

    def hold(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    return hold


def _use_redis(redis_url: str) -> None:
    """Point this process (the producer side) at the demo's Redis."""
    configure(redis_url=redis_url, result_backend_url=redis_url, kie_callback_url=None)


def _sandbox_args() -> list[str]:
    args = ["--generation-seconds", str(GENERATION_SECONDS)]
    for fault in SANDBOX_FAULTS:
        args += ["--fault", fault]
    return args


def _worker_env(redis_url: str, sandbox_url: str) -> dict[str, str]:
    """The worker's environment on top of this process's.

    :param redis_url: broker and result backend.
    :param sandbox_url: the upstream the worker talks to.
    """
    no_proxy = _no_proxy()
    return {
        "REDIS_URL": redis_url,
        "RESULT_BACKEND_URL": redis_url,
        "KIE_API_KEY": DEFAULT_API_KEY,
        "KIE_BASE_URL": sandbox_url,
        "KIE_UPLOAD_BASE_URL": sandbox_url,
        "IDEOGRAM_BASE_URL": sandbox_url,
        "IDEOGRAM_API_KEY": DEFAULT_API_KEY,
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
        # The sandbox's result URLs are on 127.0.0.1 (archived with REMIX_ARCHIVE_URL set).
        "REMIX_ARCHIVE_ALLOW_PRIVATE": "1",
        **WORKER_SETTINGS,
    }


def _no_proxy() -> str:
    """The proxy exceptions of this environment plus the loopback names the sandbox uses."""
    current = os.environ.get("no_proxy") or os.environ.get("NO_PROXY") or ""
    return ",".join(part for part in (current, LOOPBACK, "localhost") if part)


def _draw_source_image(path: Path) -> Path:
    """A small PNG for the jobs whose source image is a local file."""
    from PIL import Image

    Image.new("RGB", LOCAL_SOURCE_SIZE, LOCAL_SOURCE_COLOUR).save(path, format="PNG")
    return path


def _enqueue(fields: dict[str, Any], source: Path) -> str:
    request: dict[str, Any] = {k: (source if v == LOCAL_SOURCE else v) for k, v in fields.items()}
    if request.get("provider") == "ideogram-remix":
        return enqueue_remix(**request)
    request.setdefault("image_url", None if "image_file" in request else SOURCE_IMAGE)
    return enqueue_remix(reference_image_urls=[REFERENCE_IMAGE], **request)


def _save_results(record: JobRecord | None, output_dir: Path) -> list[Saved]:
    """Download a succeeded job's images to ``<output_dir>/<job id>-<n>.png``.

    :param record: the job's last record.
    :param output_dir: the directory, created when missing.
    """
    if record is None or record.state is not JobState.SUCCEEDED:
        return []
    output_dir.mkdir(parents=True, exist_ok=True)
    saved: list[Saved] = []
    with requests.Session() as session:
        session.trust_env = False
        for index, url in enumerate(record.result_urls):
            path = output_dir / f"{record.job_id}-{index}.png"
            try:
                response = session.get(url, timeout=DOWNLOAD_TIMEOUT_S)
                response.raise_for_status()
            except requests.RequestException as exc:
                saved.append(Saved(url, error=str(exc)))
                continue
            path.write_bytes(response.content)
            saved.append(Saved(url, path))
    return saved


def _results_table(
    job_ids: Sequence[str], records: dict[str, JobRecord | None], saved: dict[str, list[Saved]]
) -> Table:
    table = Table(title="remixq demo")
    table.add_column("job id", no_wrap=True)
    table.add_column("state")
    for name in ("submit attempts", "polls", "seconds"):
        table.add_column(name, justify="right")
    table.add_column("saved image / URL", overflow="fold")
    for job_id in job_ids:
        record = records[job_id]
        if record is None:
            table.add_row(job_id, "missing", "", "", "", "")
            continue
        seconds = job_seconds(record)
        table.add_row(
            job_id,
            _state_text(record),
            str(record.submit_attempts),
            str(record.polls),
            "" if seconds is None else f"{seconds:.1f}",
            "\n".join(_saved_text(item) for item in saved[job_id]),
        )
    return table


def _state_text(record: JobRecord) -> str:
    if record.state is JobState.SUCCEEDED:
        return f"[green]{record.state.value}[/]"
    return f"[red]{record.state.value}[/] {record.fail_code or ''}".rstrip()


def _saved_text(item: Saved) -> str:
    if item.path is None:
        return f"[red]download failed[/]: {item.error}\n{item.url}"
    return f"{item.path}\n[dim]{item.url}[/]"


def _sandbox_summary(sandbox_url: str) -> str:
    """One line of the sandbox's counters: requests per endpoint and answer code."""
    control = SandboxControl(sandbox_url)
    try:
        stats = control.stats()
    except requests.RequestException:
        return "sandbox statistics unavailable"
    finally:
        control.close()
    parts = []
    for endpoint, total, codes in (
        ("createTask", "create_requests", "create_by_code"),
        ("recordInfo", "record_requests", "record_by_code"),
        ("file upload", "upload_requests", "upload_by_code"),
        ("relay remix", "relay_requests", "relay_by_code"),
    ):
        by_code = ", ".join(f"{code}: {n}" for code, n in sorted(stats.get(codes, {}).items()))
        parts.append(f"{endpoint} {stats.get(total, 0)} requests ({by_code})")
    return "sandbox answered " + "; ".join(parts)


def _all_good(records: dict[str, JobRecord | None], saved: dict[str, list[Saved]]) -> bool:
    succeeded = all(r is not None and r.state is JobState.SUCCEEDED for r in records.values())
    downloaded = all(item.path is not None for items in saved.values() for item in items)
    return succeeded and downloaded


def _stop_all(started: list[ManagedProcess], console: Console) -> None:
    """Stop the processes, the last started first; Ctrl-C or SIGTERM does not cut this short."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        for process in reversed(started):
            process.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if started:
        console.print(f"stopped {len(started)} process(es)")


@click.command("demo")
@click.option(
    "--redis-url",
    help="Redis for the demo (started when a local one does not answer); default: a private "
    "redis-server on a free port, or database 15 of REDIS_URL when redis-server is missing.",
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, writable=True),
    default="demo-output",
    show_default=True,
    help="Where the result images are saved.",
)
def demo_command(redis_url: str | None, output_dir: str) -> None:
    """Run the whole pipeline on this machine: Redis, the sandbox, a worker, a few jobs."""
    with redis_errors():
        code = run_demo(redis_url, output_dir)
    raise click.exceptions.Exit(code)
