"""``REMIX_WORKER_CONCURRENCY`` and its default: the CPU quota of the process's cgroup.

The cgroup files are written into a temporary directory laid out like ``/sys/fs/cgroup``
(v2: ``cpu.max`` along the process's cgroup path; v1: ``cpu,cpuacct/cpu.cfs_*_us``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker import cpu
from worker.app import celery_config
from worker.settings import ConfigurationError, load_settings

CPUS = 8


@pytest.fixture
def cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cgroup tree, ``/proc/self/cgroup`` naming its root, on a machine of 8 CPUs."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (tmp_path / "proc-self-cgroup").write_text("0::/\n")
    monkeypatch.setattr(cpu, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpu, "PROC_SELF_CGROUP", tmp_path / "proc-self-cgroup")
    monkeypatch.setattr(cpu, "available_cpus", lambda: CPUS)
    return root


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def concurrency(root: Path) -> int:
    """The default pool size (the fixture points the module at ``root``)."""
    assert root == cpu.CGROUP_ROOT
    return cpu.default_concurrency()


def test_without_a_quota_the_default_is_the_cpus(cgroup: Path) -> None:
    assert concurrency(cgroup) == CPUS
    write(cgroup / "cpu.max", "max 100000")
    assert concurrency(cgroup) == CPUS


@pytest.mark.parametrize(
    ("cpu_max", "expected"), [("200000 100000", 2), ("150000 100000", 2), ("10000 100000", 1)]
)
def test_a_v2_quota_rounded_up_is_the_default(cgroup: Path, cpu_max: str, expected: int) -> None:
    write(cgroup / "cpu.max", cpu_max)
    assert concurrency(cgroup) == expected


def test_the_tightest_quota_on_the_processs_cgroup_path_wins(cgroup: Path) -> None:
    write(cgroup.parent / "proc-self-cgroup", "0::/system.slice/remixq-worker@1.service")
    write(cgroup / "system.slice" / "remixq-worker@1.service" / "cpu.max", "max 100000")
    write(cgroup / "system.slice" / "cpu.max", "300000 100000")
    write(cgroup / "other.slice" / "cpu.max", "100000 100000")
    assert concurrency(cgroup) == 3


def test_a_cgroup_path_not_mounted_here_reads_the_root(cgroup: Path) -> None:
    write(cgroup.parent / "proc-self-cgroup", "0::/kubepods/pod1/abc")
    write(cgroup / "cpu.max", "400000 100000")
    assert concurrency(cgroup) == 4


@pytest.mark.parametrize(("quota", "expected"), [("250000", 3), ("-1", CPUS), ("garbage", CPUS)])
def test_a_v1_quota_rounded_up_is_the_default(cgroup: Path, quota: str, expected: int) -> None:
    write(cgroup / "cpu,cpuacct" / "cpu.cfs_quota_us", quota)
    write(cgroup / "cpu,cpuacct" / "cpu.cfs_period_us", "100000")
    assert concurrency(cgroup) == expected


def test_a_quota_above_the_cpus_gives_the_cpus(cgroup: Path) -> None:
    write(cgroup / "cpu.max", "3200000 100000")
    assert concurrency(cgroup) == CPUS


def test_the_setting_wins_over_the_quota(cgroup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(cgroup / "cpu.max", "200000 100000")
    assert load_settings().worker_concurrency == 2
    monkeypatch.setenv("REMIX_WORKER_CONCURRENCY", "5")
    assert load_settings().worker_concurrency == 5


@pytest.mark.parametrize("value", ["", "0", "-1", "two", "1.5"])
def test_a_bad_worker_concurrency_stops_the_process(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("REMIX_WORKER_CONCURRENCY", value)
    with pytest.raises(ConfigurationError, match=r"^invalid configuration: REMIX_WORKER_CONC"):
        load_settings()


def test_the_celery_config_sizes_the_pool_from_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REMIX_WORKER_CONCURRENCY", "3")
    monkeypatch.setattr("worker.app.get_settings", load_settings)
    assert celery_config()["worker_concurrency"] == 3


def test_the_cpus_are_those_this_process_may_run_on() -> None:
    assert 1 <= cpu.available_cpus() <= (os.cpu_count() or 1)
