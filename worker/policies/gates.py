"""What a submit must pass before it may send createTask: the key's pause, its spend cap
and its rate budget.

Each gate answers ``None`` (go on) or a :class:`Wait`: park the job in the schedule for
that long. A wait is not a retry: it spends no retry budget, sends nothing upstream and
holds no worker slot.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

from worker.limits.pause import MAX_PROBE_INTERVAL_S, FleetPause, PauseState, RecentAnswers
from worker.limits.ratelimit import EARLINESS_TOLERANCE_S, LATENESS_TOLERANCE_S, SharedRateLimiter
from worker.services import Services
from worker.store.jobs import LAST_ERROR_FIELD, SLOT_FIELD, SPEND_FIELD, Job, JobStore
from worker.upstreams.errors import RateLimitedError, UpstreamError

logger = logging.getLogger("worker.gates")

#: How often a job held by an operator's pause looks again (``remixq resume`` wakes
#: held jobs at once; this is only the fallback).
OPERATOR_PAUSE_RECHECK_S = 60.0
#: A budget moment may be reserved this far ahead; a job further back in line waits
#: without a reservation until it is within reach.
RESERVE_AHEAD_S = 600.0
#: Spread of wake-ups of jobs held by the same condition.
WAKE_JITTER_S = 1.0
#: Jobs released when a pause ends become due over this many seconds.
RELEASE_SPREAD_S = 2.0
#: Hold of the whole key per 429 in a run of 429s that came without ``Retry-After``.
RATE_LIMITED_RUN_HOLD_S = 2.0
#: A job held by the spend cap past its submit deadline wakes this long after it, to fail.
DEADLINE_WAKE_MARGIN_S = 1.0


@dataclass(frozen=True)
class Wait:
    """Park the job for ``seconds``, writing ``fields`` (its reserved slot, the reason)."""

    seconds: float
    fields: dict[str, Any] = field(default_factory=dict)


def _jittered(seconds: float, spread: float = WAKE_JITTER_S) -> float:
    return max(0.0, seconds) + random.uniform(0, spread)


# ------------------------------------------------------------------ the pause


def pause_gate(svc: Services, job: Job) -> Wait | None:
    """Hold the job while submissions are paused for the key; probe when it is due."""
    state = svc.pause.state()
    if state is None:
        return None
    if not state.by_operator and svc.pause.claim_probe() and probe_key(svc, state.reason):
        end_pause(svc, state)
        return None
    svc.store.hold(svc.api_key_id, job.job_id)
    code = "paused" if state.by_operator else state.reason
    reason = {LAST_ERROR_FIELD: {"code": code, "msg": state.message}}
    if state.by_operator:
        return Wait(_jittered(OPERATOR_PAUSE_RECHECK_S), reason)
    until_probe = min(svc.pause.seconds_to_probe(), MAX_PROBE_INTERVAL_S)
    return Wait(_jittered(until_probe), reason)


def probe_key(svc: Services, reason: str) -> bool:
    """One cheap request that says whether the key can submit again (its provider's)."""
    try:
        credits = svc.status_client().credit()
    except UpstreamError as exc:
        logger.info("probe after %s: still unavailable (%s)", reason, exc.fail_code)
        return False
    if reason == "402" and credits <= 0:
        logger.info("probe after 402: still no credits")
        return False
    return True


def end_pause(svc: Services, state: PauseState) -> None:
    """A probe succeeded: end that pause (only that one) and wake the jobs it held."""
    if svc.pause.end(state):
        released = svc.store.release_held(svc.api_key_id, RELEASE_SPREAD_S)
        logger.warning(
            "upstream key usable again (probe after %s): resuming %d held job(s)",
            state.reason,
            released,
        )


def trip_pause(svc: Services, reason: str, message: str) -> None:
    """Pause the fleet for the key; the worker that does so says it once, loudly."""
    if svc.pause.trip(reason, message):
        logger.error(
            "upstream answered %s (%s): every worker holds submissions for this key "
            "until a probe succeeds or an operator runs `remixq resume`",
            reason,
            message or "no message",
        )


# ------------------------------------------------------------------ the budget


def budget_gate(svc: Services, job: Job) -> Wait | None:
    """Send now if the job's reserved moment has come; otherwise wait for one."""
    limiter = svc.limiter
    if job.slot is not None:
        now = limiter.now()
        if limiter.blocked_until() <= job.slot:
            late_by = now - job.slot
            if late_by < -EARLINESS_TOLERANCE_S:
                return Wait(-late_by, {SLOT_FIELD: job.slot})
            if late_by <= LATENESS_TOLERANCE_S:
                return None
    reservation = limiter.reserve(max_ahead=RESERVE_AHEAD_S)
    if reservation.reserved and reservation.delay <= EARLINESS_TOLERANCE_S:
        return None
    # The job waits for the key: an operator's resume wakes it (see resume_key).
    svc.store.hold(svc.api_key_id, job.job_id)
    svc.metrics.count("limiter_waits_total")
    if not reservation.reserved:
        # Wake once the moment is within reach; spread the crowd over the horizon.
        wait = reservation.delay - RESERVE_AHEAD_S
        return Wait(_jittered(wait, RESERVE_AHEAD_S / 4), {SLOT_FIELD: None})
    return Wait(reservation.delay, {SLOT_FIELD: reservation.at})


# ------------------------------------------------------------------ the spend cap


def spend_gate(svc: Services, job: Job) -> Wait | None:
    """Send only within the key's spend cap (``REMIX_SPEND_CAP``); otherwise wait for it.

    Runs before the rate budget, so that a job never holds a rate moment it may not spend.
    The job keeps one spend reservation (``SPEND_FIELD``) until an attempt consumes it
    (``attempt_begin.lua``): a job that waited and comes back uses it instead of reserving
    again. A reservation whose moment passed unused (the job then waited for the rate
    budget) is replaced, in the same step, by a fresh one: a spend counts at the moment
    it is sent, or the windows would not hold.
    """
    cap = svc.spend
    if not cap.enabled:
        return None
    held = job.spend
    if held is not None:
        late_by = cap.now() - float(held["at"])
        if late_by < -EARLINESS_TOLERANCE_S:
            return _spend_wait(svc, job, -late_by, held)
        if late_by <= LATENESS_TOLERANCE_S:
            return None
    member, reservation = cap.reserve(RESERVE_AHEAD_S, replacing=held["id"] if held else None)
    if not reservation.reserved:
        # Wake once a moment is within reach; spread the crowd over the horizon. A held
        # job costs one schedule member and no message meanwhile.
        wait = _jittered(reservation.delay - RESERVE_AHEAD_S, RESERVE_AHEAD_S / 4)
        return _spend_wait(svc, job, wait, None)
    svc.metrics.count("spend_reservations_total")
    fresh = {"id": member, "at": reservation.at}
    if reservation.delay > EARLINESS_TOLERANCE_S:
        return _spend_wait(svc, job, reservation.delay, fresh)
    if not svc.store.set_internal(job.job_id, SPEND_FIELD, fresh):
        cap.refund(member)  # the job finished meanwhile (cancelled)
    return None


def _spend_wait(svc: Services, job: Job, seconds: float, held: dict[str, Any] | None) -> Wait:
    """Park the job (still queued, no retry spent) for the cap, but not past its submit
    deadline: it then wakes to fail like any job never accepted in time."""
    svc.metrics.count("spend_cap_waits_total")
    deadline = job.record.created_at + svc.settings.remix_submit_deadline_s
    until_deadline = max(0.0, deadline - svc.clock.now()) + DEADLINE_WAKE_MARGIN_S
    return Wait(min(seconds, until_deadline), {SPEND_FIELD: held, SLOT_FIELD: None})


def refund_spend(svc: Services, spend: dict[str, Any] | None) -> None:
    """Give back a spend reservation whose createTask was definitely not accepted."""
    if spend is not None and svc.spend.refund(str(spend["id"])):
        svc.metrics.count("spend_refunds_total")


def resume_key(
    store: JobStore, pause: FleetPause, limiter: SharedRateLimiter, api_key_id: str
) -> bool:
    """An operator's resume: end any pause and any hold after a 429, and wake every job
    waiting for the key now (reserved moments are forgotten; the jobs reserve again).

    Returns True when the key was paused or held.
    """
    paused = pause.resume()
    blocked = limiter.clear_block()
    limiter.forget_reservations_ahead()
    store.release_held(api_key_id, RELEASE_SPREAD_S)
    return paused or blocked


def hold_after_rate_limited(svc: Services, error: RateLimitedError, recent: RecentAnswers) -> None:
    """An upstream 429 despite the budget: hold every worker when it is more than a stray.

    A ``Retry-After`` is the upstream's word for the whole key and is honoured (capped).
    Without one, a single 429 among successes only backs off its own job; a run of 429s
    (someone else is spending the key's budget) holds the fleet for a growing while.
    """
    if error.retry_after is not None:
        svc.limiter.block(error.retry_after)
    elif recent.rate_limited_run:
        svc.limiter.block(RATE_LIMITED_RUN_HOLD_S * recent.rate_limited)
