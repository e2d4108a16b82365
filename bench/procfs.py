"""Memory and CPU of a process tree, read from ``/proc`` (Linux only, no dependencies)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
KIB = 1024
#: Fields of ``/proc/<pid>/stat`` after the command name: state is field 3, ppid 4,
#: utime 14 and stime 15 (1-based, as in proc(5)); these are offsets after ``)``.
STAT_PPID = 1
STAT_UTIME = 11
STAT_STIME = 12
STAT_CUTIME = 13
STAT_CSTIME = 14
#: Columns of the ``cpu`` line of ``/proc/stat`` that are not busy time: idle and iowait.
IDLE_COLUMNS = (3, 4)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class TreeUsage:
    """What a process and its descendants use right now.

    :param processes: how many processes the tree holds.
    :param rss_bytes: the sum of their resident set sizes (``VmRSS``).
    :param cpu_seconds: the user plus system CPU time they have used so far.
    """

    processes: int
    rss_bytes: int
    cpu_seconds: float


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, or None when it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _parents() -> dict[int, int]:
    """Every visible process id mapped to its parent's id."""
    parents: dict[int, int] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            parents[int(entry.name)] = int(fields[STAT_PPID])
    return parents


def descendants(pid: int) -> list[int]:
    """``pid`` followed by all of its live descendants."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children.get(current, []))
    return tree


def _rss_bytes(pid: int) -> int:
    """``VmRSS`` of one process in bytes; 0 when it is gone (or a zombie)."""
    try:
        lines = (PROC / str(pid) / "status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KIB
    return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process (all its threads) so far; 0 when it is gone."""
    return _cpu_seconds(pid)


def _cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[STAT_UTIME]) + int(fields[STAT_STIME])) / CLOCK_TICKS


def tree_usage(pid: int) -> TreeUsage:
    """RSS and CPU time of ``pid`` and its descendants (a Celery worker and its pool).

    :param pid: the tree's root, e.g. the Celery main process.
    """
    pids = [p for p in descendants(pid) if (PROC / str(p)).exists()]
    return TreeUsage(
        processes=len(pids),
        rss_bytes=sum(_rss_bytes(p) for p in pids),
        cpu_seconds=sum(_cpu_seconds(p) for p in pids),
    )


def own_cpu_seconds() -> float:
    """CPU time of this process and everything it started, including reaped children.

    Each process's own time plus the time of its children that it has waited for
    (``cutime`` + ``cstime``): a worker stopped earlier still counts through its parent.
    """
    total = 0.0
    for pid in descendants(os.getpid()):
        fields = _stat_fields(pid)
        if fields is not None:
            ticks = (STAT_UTIME, STAT_STIME, STAT_CUTIME, STAT_CSTIME)
            total += sum(int(fields[i]) for i in ticks) / CLOCK_TICKS
    return total


def machine_busy_seconds() -> float:
    """CPU time all cores of the machine have spent busy since boot."""
    columns = [int(v) for v in (PROC / "stat").read_text().splitlines()[0].split()[1:]]
    idle = sum(columns[i] for i in IDLE_COLUMNS if i < len(columns))
    # guest time is already counted in user time.
    return (sum(columns[:8]) - idle) / CLOCK_TICKS
