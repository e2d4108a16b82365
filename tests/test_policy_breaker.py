"""The breakers of a busy key: stray 455s and 429s among many successes hold nothing; a
real run of them still pauses (455) or holds (429) the key, for a while that grows with
the run. Real Redis and the sandbox over HTTP, no worker.

What the chaos suite's storm scenario (~6 % stray 455s and 429s, about 60 answers a
second) showed: three strays that happened to come in a row among hundreds of successes
paused the fleet, or held every send of the key for 2 s per 429 of the last 10 s (22 s
to 70 s), although the upstream took nine requests in ten. See docs/design.md, "The
fleet's shared state".
"""

from __future__ import annotations

import pytest

from sandbox.server import SandboxServer
from tests.policy_kit import new_job, submit_now
from worker.limits.pause import RUN_IN_A_ROW
from worker.policies.gates import RATE_LIMITED_RUN_HOLD_S
from worker.services import Services

pytestmark = pytest.mark.policy

#: A busy key's last seconds: this many answers, one in ``STRAY_EVERY`` a stray.
BUSY_ANSWERS = 300
STRAY_EVERY = 16


def busy_key_then(svc: Services, kind: str, in_a_row: int) -> str:
    """Count the answers of a busy key whose upstream answers ``kind`` now and then, then
    ``in_a_row`` - 1 of ``kind`` in a row; the next job's submit step is the last of them.
    Returns what the step did."""
    for i in range(BUSY_ANSWERS):
        svc.pause.note_answer(kind if i % STRAY_EVERY == STRAY_EVERY - 1 else "other")
    for _ in range(in_a_row - 1):
        svc.pause.note_answer(kind)
    job_id, _ = new_job(svc, f"[sandbox:create={kind}] number {in_a_row} in a row")
    return submit_now(svc, job_id)


def test_three_stray_455s_in_a_row_among_many_successes_pause_nothing(
    svc: Services, upstream: SandboxServer
) -> None:
    assert busy_key_then(svc, "455", 3) == "held"

    assert svc.pause.state() is None, "stray 455s paused the fleet"


def test_a_run_of_455s_on_a_busy_key_still_pauses_it(
    svc: Services, upstream: SandboxServer
) -> None:
    assert busy_key_then(svc, "455", RUN_IN_A_ROW) == "held"

    state = svc.pause.state()
    assert state is not None and state.reason == "455"


def test_three_stray_429s_in_a_row_among_many_successes_hold_nothing(
    svc: Services, upstream: SandboxServer
) -> None:
    assert busy_key_then(svc, "429", 3) == "retry"

    blocked_for = svc.limiter.usage().blocked_for
    assert blocked_for == 0, f"stray 429s held every send of the key for {blocked_for:.0f}s"


def test_a_run_of_429s_on_a_busy_key_holds_it_for_the_run_not_for_every_stray(
    svc: Services, upstream: SandboxServer
) -> None:
    assert busy_key_then(svc, "429", RUN_IN_A_ROW) == "retry"

    blocked_for = svc.limiter.usage().blocked_for
    assert 0 < blocked_for <= RATE_LIMITED_RUN_HOLD_S * RUN_IN_A_ROW, blocked_for
