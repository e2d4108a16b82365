"""Redis fails over under load: a Sentinel group (a primary, one replica, three sentinels)
holds every Redis role; the primary is SIGKILLed while jobs are in flight and the
sentinels promote the replica. Real ``redis-server`` and ``celery -A worker.app worker``
processes and the sandbox; see :mod:`bench.failover`, which ``make chaos`` runs bigger.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.failover import run_failover

pytestmark = [pytest.mark.integration]
JOBS = 40
#: A short request deadline, so a short lease (4 + 15 s): the run stays well under a minute.
SETTINGS = {"KIE_REQUEST_DEADLINE_S": "4", "KIE_READ_TIMEOUT_S": "3"}
LEASE_S = 19.0


def test_a_failover_loses_no_job_and_pays_nothing_twice_unflagged(
    tmp_path: Path, restore_producer: None
) -> None:
    outcome = run_failover(JOBS, tmp_path, stretch_s=8.0, settings=SETTINGS)

    assert outcome.states == {"succeeded": JOBS}, outcome
    assert outcome.lost == 0
    assert outcome.paid_twice_unflagged == 0, outcome
    assert outcome.leaks == []
    # The failover really happened under load, and the old primary came back as a replica.
    assert outcome.in_flight_at_kill > 0 and 0 < outcome.promotion_s < 15, outcome
    assert outcome.rejoined_s >= 0, outcome
    # The HTTP app's readiness probe said so while there was no primary, then recovered.
    assert 0 < outcome.healthz_degraded_s < LEASE_S, outcome
    # Every job moved again within a lease of the promotion (none waited forever) ...
    assert 0 <= outcome.moved_again_s <= LEASE_S + 10, (outcome.moved_again_s, outcome.stuck)
    # ... and the workers whose broker connection broke left their jobs to it, because
    # the job store's run id changed (a lost write cannot be told from a step not begun).
    assert outcome.lease_notices > 0, outcome
