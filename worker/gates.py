"""What a submit must pass before it may call createTask: the fleet pause and the budget.

Each gate answers ``None`` (go on) or a :class:`Defer` (run again after a
countdown). A deferral is not a retry: it spends no retry budget and sends
nothing upstream.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from celery.utils.log import get_task_logger

from worker.errors import UpstreamError
from worker.jobstore import LAST_ERROR_FIELD
from worker.pause import OPERATOR
from worker.ratelimit import EARLINESS_TOLERANCE_S, LATENESS_TOLERANCE_S
from worker.runtime import fleet_pause, job_store, kie_client, rate_limiter
from worker.settings import MAX_COUNTDOWN_S

logger = get_task_logger(__name__)

#: How often a job held by an operator's pause looks again.
OPERATOR_PAUSE_RECHECK_S = 15.0
#: Spread of wake-ups of jobs held by the same condition.
WAKE_JITTER_S = 1.0
#: A retry after a whole-key answer (455/402) waits this long at least.
MIN_HOLD_S = 1.0


@dataclass(frozen=True)
class Defer:
    """Run the submit again in ``countdown`` seconds (``slot``: a reserved send moment)."""

    countdown: float
    slot: float | None = None


def _jittered(seconds: float) -> float:
    return min(MAX_COUNTDOWN_S, max(MIN_HOLD_S, seconds) + random.uniform(0, WAKE_JITTER_S))


def pause_gate(job_id: str) -> Defer | None:
    """Hold the job while submissions are paused for the key; probe when it is due."""
    pause = fleet_pause()
    state = pause.state()
    if state is None:
        return None
    if not state.by_operator and pause.claim_probe() and probe_key(state.reason):
        if pause.resume():
            logger.warning("upstream key usable again (probe after %s): resuming", state.reason)
        return None
    code = "paused" if state.reason == OPERATOR else state.reason
    job_store().set_internal(job_id, LAST_ERROR_FIELD, {"code": code, "msg": state.message})
    if state.by_operator:
        return Defer(_jittered(OPERATOR_PAUSE_RECHECK_S))
    return Defer(_jittered(pause.seconds_to_probe()))


def probe_key(reason: str) -> bool:
    """One cheap request that says whether the key can submit again."""
    try:
        credits = kie_client().credit()
    except UpstreamError as exc:
        logger.info("probe after %s: still unavailable (%s)", reason, exc.fail_code)
        return False
    if reason == "402" and credits <= 0:
        logger.info("probe after 402: still no credits")
        return False
    return True


def trip_pause(reason: str, message: str) -> None:
    """Pause the fleet for the key; the worker that does so says it once, loudly."""
    if fleet_pause().trip(reason, message):
        logger.error(
            "upstream answered %s (%s): every worker holds submissions for this key "
            "until a probe succeeds or an operator runs `remixq resume`",
            reason,
            message or "no message",
        )


def budget_gate(slot: float | None) -> Defer | None:
    """Send now if the shared budget allows; otherwise wait for a reserved moment."""
    limiter = rate_limiter()
    if slot is not None:
        late_by = limiter.now() - slot
        if late_by < -EARLINESS_TOLERANCE_S:
            return Defer(-late_by, slot)
        if late_by <= LATENESS_TOLERANCE_S:
            return None
    reservation = limiter.reserve(max_ahead=MAX_COUNTDOWN_S)
    if not reservation.reserved:
        return Defer(_jittered(reservation.delay - MAX_COUNTDOWN_S))
    if reservation.delay <= EARLINESS_TOLERANCE_S:
        return None
    return Defer(reservation.delay, reservation.at)


def hold_after_rate_limited(retry_after: float | None, fallback: float) -> None:
    """An upstream 429 despite the budget: every worker backs off."""
    rate_limiter().block(retry_after if retry_after is not None else fallback)
