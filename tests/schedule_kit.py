"""Which tests are integration or policy tests, and in which order the modules run.

A test that uses a fixture starting a process (:data:`PROCESS_FIXTURES`, and every fixture
built on them: ``fleet``, ``start_workers``, ``control``, ...) is marked ``integration``
here, so that ``make test-fast`` (``-m "not integration"``) leaves it out without anyone
marking it; a module that starts processes itself is marked in the module. A test that
uses the policy tests' database (``policy_redis``, behind ``svc``) is marked ``policy``.

Modules run slowest first, so that pytest-xdist (``--dist loadfile``, one module per worker
at a time) never starts a long module last. The seconds come from ``durations.json``
beside this file; ``--write-durations`` measures them again.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

#: Fixtures that start a process: the sandbox (``python -m sandbox``) and moto's S3 server.
PROCESS_FIXTURES = frozenset({"sandbox", "moto_s3"})
POLICY_FIXTURE = "policy_redis"
DURATIONS = Path(__file__).with_name("durations.json")
#: Seconds assumed for a module missing from DURATIONS, per test.
UNKNOWN_INTEGRATION_S = 10.0
UNKNOWN_UNIT_S = 0.1


def module_of(item: pytest.Item) -> str:
    """The test file of ``item``, as its node id names it (``tests/test_x.py``)."""
    return item.nodeid.split("::", 1)[0]


def mark_by_fixtures(items: list[pytest.Item]) -> None:
    """Mark ``integration`` every test that uses a process fixture, ``policy`` every test
    that uses the policy database."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if PROCESS_FIXTURES.intersection(fixtures):
            item.add_marker(pytest.mark.integration)
        if POLICY_FIXTURE in fixtures:
            item.add_marker(pytest.mark.policy)


def slowest_first(items: list[pytest.Item]) -> None:
    """Order ``items`` by the seconds of their module, longest first; a module stays whole."""
    known = _read_durations()
    estimate: defaultdict[str, float] = defaultdict(float)
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        module = module_of(item)
        first.setdefault(module, index)
        slow = item.get_closest_marker("integration") is not None
        estimate[module] += UNKNOWN_INTEGRATION_S if slow else UNKNOWN_UNIT_S
    seconds = {module: known.get(module, guess) for module, guess in estimate.items()}
    items.sort(key=lambda item: (-seconds[module_of(item)], first[module_of(item)]))


def _read_durations() -> dict[str, float]:
    if not DURATIONS.exists():
        return {}
    data = json.loads(DURATIONS.read_text())
    return {str(module): float(seconds) for module, seconds in data.items()}


def add_option(parser: pytest.Parser) -> None:
    parser.addoption(
        "--write-durations",
        action="store_true",
        help=f"store the seconds each test module took in {DURATIONS.name} (after a full run)",
    )


class DurationWriter:
    """Adds up the seconds of each module's setups, calls and teardowns; stores them at the
    end, keeping the modules that did not run. Registered where the reports arrive (the
    xdist controller, or pytest itself without ``-n``)."""

    def __init__(self) -> None:
        self.totals: defaultdict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.totals[report.nodeid.split("::", 1)[0]] += report.duration

    def pytest_sessionfinish(self) -> None:
        measured = {module: round(seconds, 1) for module, seconds in self.totals.items()}
        merged = {**_read_durations(), **measured}
        ordered = dict(sorted(merged.items(), key=lambda pair: -pair[1]))
        DURATIONS.write_text(json.dumps(ordered, indent=1) + "\n")


def register_writer(config: pytest.Config) -> None:
    """Register a :class:`DurationWriter` when ``--write-durations`` asks for one."""
    if config.getoption("--write-durations") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(DurationWriter(), "remixq-duration-writer")
