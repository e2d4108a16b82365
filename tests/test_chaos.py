"""The chaos suite in CI: a few hundred jobs through a fleet under faults of every kind.

~20 % faults on both upstream endpoints (429, 455, 500 as a status, in a JSON body or as a
non-JSON page; resets; cut bodies; accept-then-drop; slow answers), two worker SIGKILLs, a
restart of the job store's Redis (append-only file) and a broker outage of several seconds;
see :mod:`bench.chaos`, which ``make chaos`` runs bigger. About three minutes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import SCENARIOS, WORKER_SETTINGS, run_scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]
JOBS = 200


def test_no_job_lost_none_paid_twice_unflagged_no_secret_leaked(
    tmp_path: Path, restore_producer: None
) -> None:
    outcome = run_scenario(SCENARIOS["chaos"], JOBS, tmp_path)

    assert outcome.states == {"succeeded": JOBS}, outcome.states
    assert outcome.lost == 0
    assert outcome.paid_twice_unflagged == 0, outcome
    assert outcome.leaks == []
    # The faults really happened: the run proves something.
    assert (outcome.kills, outcome.store_restarts) == (2, 1) and outcome.broker_outage_s > 0
    assert outcome.ambiguous > 0 and outcome.faults["resets"] > 0
    assert sum(n for kind, n in outcome.faults.items() if kind.startswith("record")) > 0
    # Every job moved again after each kill and after the outage (none waited forever).
    lease = float(WORKER_SETTINGS["KIE_REQUEST_DEADLINE_S"]) + 15
    recoveries = outcome.moved_again_after_kill_s + outcome.moved_again_after_outage_s
    assert all(0 <= seconds <= lease + 15 for seconds in recoveries), (recoveries, outcome.stuck)
