"""The command line: ``python -m bench [--quick] [--only NAME ...] [--write-docs]``."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from bench.procfs import machine_busy_seconds, own_cpu_seconds
from bench.report import Figure, Report, duration, machine_info, now_utc, rich_table, write_docs
from bench.sections import DEPENDS_ON, GROUPS, SECTIONS, Plan, Run
from bench.stack import Stack
from sandbox.launch import REPO_ROOT, LaunchError, sigterm_as_interrupt

DEFAULT_DOCS = REPO_ROOT / "docs" / "benchmarks.md"
#: Console width when the output is not a terminal (a log file, ``make`` in CI).
PIPE_WIDTH = 160
#: Sections shorter than this (derived figures only) get no machine-load row.
MIN_LOAD_WINDOW_S = 5.0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the remixq pipeline against the local sandbox upstream, "
        "on a private Redis, and print one table.",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=[*SECTIONS, *GROUPS],
        metavar="NAME",
        help=f"run only this section (repeatable): {', '.join(SECTIONS)}; or a group: "
        + "; ".join(f"{group} ({', '.join(names)})" for group, names in GROUPS.items()),
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, shorter windows")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="write the table into the 'Latest run' section of the benchmarks document",
    )
    parser.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help="the document to write")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the processes' logs even when all went well"
    )
    return parser.parse_args(argv)


def section_names(only: Sequence[str] | None) -> list[str]:
    """The sections to run, in the order of a full run, with what they depend on."""
    if not only:
        return list(SECTIONS)
    wanted = {section for name in only for section in GROUPS.get(name, (name,))}
    for name in list(wanted):
        wanted.update(DEPENDS_ON.get(name, ()))
    return [name for name in SECTIONS if name in wanted]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0 when every section ran)."""
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
    names = section_names(args.only)
    log_dir = Path(tempfile.mkdtemp(prefix="remixq-bench-"))
    command = " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])])
    report = Report(command=command, started=now_utc())
    console.print(f"[bold]remixq benchmark[/]: {', '.join(names)}; logs in {log_dir}")
    began = time.monotonic()
    stack = Stack(log_dir)
    failed = False
    try:
        with sigterm_as_interrupt():
            stack.start_redis()
            console.print(f"private Redis at {stack.redis_url}")
            run = Run(stack, Plan.make(args.quick))
            for name in names:
                failed |= not _run_section(console, run, name, report)
    except LaunchError as exc:
        console.print(f"[red]error:[/] {exc}")
        failed = True
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; stopping everything")
        stack.close()
        return EXIT_INTERRUPTED
    finally:
        stack.close()
    report.seconds = time.monotonic() - began
    report.machine = machine_info()
    console.print(rich_table(report))
    if failed or args.keep_logs:
        console.print(f"logs kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    if args.write_docs and report.figures:
        write_docs(report, args.docs)
        console.print(f"wrote the latest run to {args.docs}")
    return EXIT_FAILED if failed else 0


def _run_section(console: Console, run: Run, name: str, report: Report) -> bool:
    """Run one section and add its rows; a failure becomes a row. Returns success."""
    console.print(f"[bold]{name}[/] ...")
    began, busy, own = time.monotonic(), machine_busy_seconds(), own_cpu_seconds()
    try:
        figures = SECTIONS[name](run)
    except (KeyboardInterrupt, LaunchError):
        raise
    except Exception as exc:
        console.print_exception(max_frames=5)
        report.figures.append(Figure(name, "failed", type(exc).__name__, note=str(exc)[:300]))
        return False
    seconds = time.monotonic() - began
    if figures and seconds >= MIN_LOAD_WINDOW_S:
        other = (machine_busy_seconds() - busy - (own_cpu_seconds() - own)) / seconds
        figures.append(
            Figure(
                figures[0].section,
                "CPU used by other processes on the machine",
                f"{max(other, 0.0):.2f} cores",
                f"of {os.cpu_count()}",
                "",
                f"busy CPU not spent by this benchmark's processes, over the {duration(seconds)} "
                "of the section",
            )
        )
    report.figures += figures
    console.print(f"  {name} took {duration(seconds)}")
    return True
