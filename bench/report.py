"""The benchmark's figures, the machine they were measured on, and how they are shown.

The same rows go to the terminal (a rich table) and, with ``--write-docs``, into the
"Latest run" section of ``docs/benchmarks.md``; the rest of that file is kept.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from rich.table import Table

from sandbox.launch import REPO_ROOT

CPUINFO = Path("/proc/cpuinfo")
LATEST_RUN_HEADING = "## Latest run"
DEFAULT_DOC_TITLE = "# Benchmarks\n\nRun `make bench` (or `python -m bench --help`).\n"
GIT_TIMEOUT_S = 5.0
#: Directories whose uncommitted changes are worth naming next to the commit.
CODE_DIRS = ("worker", "producers", "sandbox", "bench")
TABLE_TITLE = "remixq benchmark"
COLUMNS = ("section", "figure", "value", "baseline / reference", "ratio")
RIGHT_ALIGNED = frozenset({"value", "ratio"})


@dataclass(frozen=True)
class Figure:
    """One row of the results.

    :param section: the section that measured it.
    :param name: what was measured.
    :param value: the measured value, formatted.
    :param baseline: what it is compared with, formatted ("" for none).
    :param ratio: value / baseline, formatted ("" for none).
    :param note: a remark shown under the table.
    """

    section: str
    name: str
    value: str
    baseline: str = ""
    ratio: str = ""
    note: str = ""

    def cells(self) -> tuple[str, str, str, str, str]:
        return (self.section, self.name, self.value, self.baseline, self.ratio)


@dataclass
class Report:
    """Everything one run printed: its figures and the circumstances.

    :param command: the command line that ran.
    :param started: when the run began.
    :param seconds: how long it took.
    :param figures: the rows, in order.
    :param machine: (label, value) pairs describing the machine and the code.
    """

    command: str
    started: datetime
    seconds: float = 0.0
    figures: list[Figure] = field(default_factory=list)
    machine: list[tuple[str, str]] = field(default_factory=list)

    @property
    def notes(self) -> list[str]:
        return [f"{f.section} / {f.name}: {f.note}" for f in self.figures if f.note]


def ratio(value: float, baseline: float, *, percent: bool = False) -> str:
    """``value / baseline`` as ``97.5 %`` or ``12.3x``; "n/a" when the baseline is 0."""
    if baseline == 0:
        return "n/a"
    share = value / baseline
    return f"{share * 100:.1f} %" if percent else f"{share:.2f}x"


def duration(seconds: float) -> str:
    """``754.2`` -> ``12 min 34 s``."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def machine_info() -> list[tuple[str, str]]:
    """CPU model, cores, memory, Python, Celery, Redis and the code's commit."""
    return [
        ("cpu", f"{_cpu_model()}, {os.cpu_count()} cores"),
        ("memory", f"{_memory_gib():.1f} GiB"),
        ("python", f"{platform.python_version()} ({platform.system()} {platform.release()})"),
        ("celery", _package_version("celery")),
        ("kombu / redis-py", f"{_package_version('kombu')} / {_package_version('redis')}"),
        ("redis-server", _redis_server_version()),
        ("code", _code_version()),
    ]


def _cpu_model() -> str:
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def _memory_gib() -> float:
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return float(pages * page_size) / 2**30


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _run_text(command: list[str]) -> str:
    try:
        done = subprocess.run(
            command,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def _redis_server_version() -> str:
    text = _run_text(["redis-server", "--version"])
    match = re.search(r"v=(\S+)", text)
    return match.group(1) if match else "unknown"


def _code_version() -> str:
    commit = _run_text(["git", "rev-parse", "--short", "HEAD"]).strip() or "unknown commit"
    changed = _run_text(["git", "status", "--porcelain", "--", *CODE_DIRS])
    dirs = sorted({line[3:].split("/", 1)[0] for line in changed.splitlines() if len(line) > 3})
    return f"{commit} + uncommitted changes in {', '.join(dirs)}" if dirs else commit


# ---------------------------------------------------------------------- output


def rich_table(report: Report) -> Table:
    """The figures as a rich table, with the machine and the notes as its caption."""
    table = Table(title=TABLE_TITLE, caption=_caption(report), caption_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in RIGHT_ALIGNED else "left")
    previous = ""
    for figure in report.figures:
        cells = list(figure.cells())
        if cells[0] == previous:
            cells[0] = ""
        else:
            if previous:
                table.add_section()
            previous = cells[0]
        table.add_row(*cells)
    return table


def _caption(report: Report) -> str:
    lines = [f"{label}: {value}" for label, value in report.machine]
    lines.append(
        f"run: {report.started:%Y-%m-%d %H:%M} UTC, {duration(report.seconds)}, `{report.command}`"
    )
    lines += [f"note - {note}" for note in report.notes]
    return "\n".join(lines)


def markdown(report: Report) -> str:
    """The "Latest run" section: the table, the machine and the notes in Markdown."""
    lines = [
        LATEST_RUN_HEADING,
        "",
        f"`{report.command}` on {report.started:%Y-%m-%d %H:%M} UTC; "
        f"the run took {duration(report.seconds)}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---:" if c in RIGHT_ALIGNED else "---" for c in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in f.cells()) + " |" for f in report.figures]
    lines += ["", "Machine:", ""]
    lines += [f"- {label}: {_md_cell(value)}" for label, value in report.machine]
    if report.notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {_md_cell(note)}" for note in report.notes]
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_docs(report: Report, path: Path) -> None:
    """Replace the "Latest run" section of ``path`` (added when missing); keep the rest.

    The section runs from its heading to the next second-level heading or the end.
    """
    text = path.read_text() if path.exists() else DEFAULT_DOC_TITLE
    start = text.find(LATEST_RUN_HEADING)
    if start < 0:
        head, tail = text.rstrip("\n") + "\n\n", ""
    else:
        following = text.find("\n## ", start + len(LATEST_RUN_HEADING))
        head = text[:start]
        tail = "" if following < 0 else text[following + 1 :]
    section = markdown(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + section + ("\n" + tail if tail else ""))


def now_utc() -> datetime:
    return datetime.now(UTC)
