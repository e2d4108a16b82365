"""How many CPUs this process may use: the default of ``REMIX_WORKER_CONCURRENCY``.

A container sees every core of its node in ``os.cpu_count()``, while its CPU quota
(Kubernetes ``limits.cpu``, ``docker run --cpus``, systemd ``CPUQuota=``) is in its
cgroup: ``cpu.max`` (cgroups v2, the process's own cgroup and each above it) or
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (v1). See docs/operations.md ("Sizing").
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
#: Where cgroups v1 mounts the cpu controller (one of them, by distribution).
_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, else every CPU), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cpu_quota() -> float | None:
    """The CPUs the cgroup quota allows (``1.5`` for 150000/100000); None when unlimited."""
    found = (*_v2_quotas(CGROUP_ROOT, PROC_SELF_CGROUP), _v1_quota(CGROUP_ROOT))
    quotas = [quota for quota in found if quota is not None]
    return min(quotas, default=None)


def default_concurrency() -> int:
    """The CPU quota rounded up, never more than the CPUs there are; else the CPUs; >= 1."""
    quota = cpu_quota()
    cpus = available_cpus()
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _ratio(quota: str, period: str) -> float | None:
    """``quota / period`` in CPUs; None for ``max``, ``-1`` or anything unreadable."""
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def _v2_quotas(root: Path, proc_cgroup: Path) -> list[float | None]:
    """``cpu.max`` of this process's cgroup and of each one above it (the tightest wins)."""
    own = next(
        (line[3:] for line in (_read(proc_cgroup) or "").splitlines() if line.startswith("0::")),
        "/",
    )
    directory = root / own.strip("/")
    if not directory.is_dir():  # a host path seen from a container: its cgroup is the root
        directory = root
    found = []
    for place in (directory, *directory.parents):
        if place != root and root not in place.parents:
            break
        text = _read(place / "cpu.max")
        if text is not None and len(parts := text.split()) == 2:
            found.append(_ratio(*parts))
    return found


def _v1_quota(root: Path) -> float | None:
    for name in _V1_CPU_DIRS:
        quota = _read(root / name / "cpu.cfs_quota_us")
        period = _read(root / name / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            return _ratio(quota, period)
    return None
