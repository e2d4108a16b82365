"""What a submit must pass before it may send createTask: the key's pause, a send moment
of its budget (given to the job by the lines, :mod:`worker.store.lines`; used only once
the attempt is open, :func:`use_send_moment`), its spend cap.

Each gate answers ``None`` (go on) or a :class:`Wait`: park the job in the schedule for
that long, or put it back in its line (``in_line``). A wait is not a retry: it spends no
retry budget, sends nothing upstream and holds no worker slot.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

from worker.limits.pause import MAX_PROBE_INTERVAL_S, FleetPause, PauseState, RecentAnswers
from worker.limits.ratelimit import SharedRateLimiter, return_grant
from worker.limits.spendcap import EARLINESS_TOLERANCE_S, LATENESS_TOLERANCE_S
from worker.services import Services
from worker.store.jobs import GRANT_FIELD, LAST_ERROR_FIELD, SPEND_FIELD, Job, JobStore
from worker.upstreams.errors import RateLimitedError, UpstreamError

logger = logging.getLogger("worker.gates")

#: How often a job held by an operator's pause looks again (``remixq resume`` wakes
#: held jobs at once; this is only the fallback).
OPERATOR_PAUSE_RECHECK_S = 60.0
#: Spread of wake-ups of jobs held by the same condition.
WAKE_JITTER_S = 1.0
#: Jobs released when a pause ends become due over this many seconds.
RELEASE_SPREAD_S = 2.0
#: Hold of the whole key per 429 of a run of 429s that came without ``Retry-After``.
RATE_LIMITED_RUN_HOLD_S = 2.0
#: A job held by the spend cap past its submit deadline wakes this long after it, to fail.
DEADLINE_WAKE_MARGIN_S = 1.0


@dataclass(frozen=True)
class Wait:
    """Park the job for ``seconds``, writing ``fields`` (its spend moment, the reason).

    ``in_line``: the job waits in its line for a send moment instead; ``seconds`` is then
    when the schedule hands it out anyway (its submit deadline).
    """

    seconds: float
    fields: dict[str, Any] = field(default_factory=dict)
    in_line: bool = False


def _jittered(seconds: float, spread: float = WAKE_JITTER_S) -> float:
    return max(0.0, seconds) + random.uniform(0, spread)


# ------------------------------------------------------------------ the pause


def pause_gate(svc: Services, job: Job, state: PauseState | None) -> Wait | None:
    """Hold the job while submissions are paused for the key (``state``: its pause, as
    just read); probe when it is due."""
    if state is None:
        return None
    if not state.by_operator and svc.pause.claim_probe() and probe_key(svc, state.reason):
        end_pause(svc, state)
        return None
    svc.store.hold(svc.api_key_id, job.job_id)
    if job.grant is not None:
        svc.limiter.give_back([job.grant])
    code = "paused" if state.by_operator else state.reason
    reason = {LAST_ERROR_FIELD: {"code": code, "msg": state.message}, GRANT_FIELD: None}
    if state.by_operator:
        return Wait(_jittered(OPERATOR_PAUSE_RECHECK_S), reason)
    until_probe = min(svc.pause.seconds_to_probe(), MAX_PROBE_INTERVAL_S)
    return Wait(_jittered(until_probe), reason)


def back_in_line_if_resumed(svc: Services, job: Job) -> bool:
    """After a job was held for a pause: if the pause ended meanwhile (a resume or a probe
    between this step's look at the pause and its hold, which released the held jobs
    before this one was held), put it back in its line now instead of at its recheck."""
    return svc.pause.state() is None and back_in_line(svc, job)


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
        deadline_s = svc.settings.remix_submit_deadline_s + DEADLINE_WAKE_MARGIN_S
        released = svc.store.release_held(svc.api_key_id, RELEASE_SPREAD_S, deadline_s)
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


def line_gate(svc: Services, job: Job) -> Wait | None:
    """A job without a send moment waits for one in its line, at its place."""
    if job.grant is not None:
        return None
    return _back_in_line(svc, job)


def use_send_moment(svc: Services, job: Job) -> bool:
    """Use the job's send moment now, just before createTask goes out (its attempt is
    open), so that the budget's log holds the real send time; False when it is void
    (late, given back, or the key was blocked since).

    A moment of another key's budget (a key rotation: workers of both keys pick from the
    same lines) is given back to that key, and the job, which won its turn, takes a moment
    of this worker's key if one is free now.
    """
    grant = job.grant
    if grant is not None and not svc.limiter.owns(grant):
        return_grant(svc.broker, grant)
        grant = next(iter(svc.limiter.grant(1, 1, svc.spend.windows).members), None)
    if grant is not None and svc.limiter.consume(grant):
        return True
    svc.metrics.count("limiter_waits_total")
    return False


def back_in_line(svc: Services, job: Job) -> bool:
    """Put the job back in its line, at its place; False when it may not wait there (it
    finished, was accepted, or a newer message owns it)."""
    wait = _back_in_line(svc, job)
    return svc.lines.join(job, wait.seconds, **wait.fields) == 1


def _back_in_line(svc: Services, job: Job) -> Wait:
    deadline = job.record.created_at + svc.settings.remix_submit_deadline_s
    until_deadline = max(0.0, deadline - svc.clock.now()) + DEADLINE_WAKE_MARGIN_S
    return Wait(until_deadline, {GRANT_FIELD: None}, in_line=True)


# ------------------------------------------------------------------ the spend cap


def spend_gate(svc: Services, job: Job) -> Wait | None:
    """Send only within the key's spend cap (``REMIX_SPEND_CAP``).

    The job's send moment was granted while the cap had room (``grant.lua``), so a spend
    reservation now is nearly always there; when another worker's send filled the cap
    meanwhile, the job goes back to its line, reserving nothing (its send moment is lost,
    which only delays). The reservation is kept (``SPEND_FIELD``) until an attempt
    consumes it (``attempt_begin.lua``); one whose moment passed unused is replaced.
    """
    cap = svc.spend
    if not cap.enabled:
        return None
    held = job.spend
    if held is not None:
        late_by = cap.now() - float(held["at"])
        if -EARLINESS_TOLERANCE_S <= late_by <= LATENESS_TOLERANCE_S:
            return None
    member, reservation = cap.reserve(EARLINESS_TOLERANCE_S, replacing=held["id"] if held else None)
    if not reservation.reserved:
        svc.metrics.count("spend_cap_waits_total")
        if job.grant is not None:
            return_grant(svc.broker, job.grant)  # its moment is for a job that may spend
        wait = _back_in_line(svc, job)
        return Wait(wait.seconds, {**wait.fields, SPEND_FIELD: None}, in_line=True)
    svc.metrics.count("spend_reservations_total")
    if not svc.store.set_internal(job.job_id, SPEND_FIELD, {"id": member, "at": reservation.at}):
        cap.refund(member)  # the job finished meanwhile (cancelled)
    return None


def refund_spend(svc: Services, spend: dict[str, Any] | None) -> None:
    """Give back a spend reservation whose createTask was definitely not accepted."""
    if spend is not None and svc.spend.refund(str(spend["id"])):
        svc.metrics.count("spend_refunds_total")


def resume_key(
    store: JobStore,
    pause: FleetPause,
    limiter: SharedRateLimiter,
    api_key_id: str,
    deadline_s: float,
) -> bool:
    """An operator's resume: end any pause and any hold after a 429, and put every job
    held for the key back in its line (``deadline_s``: ``REMIX_SUBMIT_DEADLINE_S``).

    Returns True when the key was paused or held.
    """
    paused = pause.resume()
    blocked = limiter.clear_block()
    store.release_held(api_key_id, RELEASE_SPREAD_S, deadline_s + DEADLINE_WAKE_MARGIN_S)
    return paused or blocked


def hold_after_rate_limited(svc: Services, error: RateLimitedError, recent: RecentAnswers) -> None:
    """An upstream 429 despite the budget: hold every worker when it is more than a stray.

    A ``Retry-After`` is the upstream's word for the whole key and is honoured (capped).
    Without one, a stray 429 among successes only backs off its own job; a run of 429s
    (someone else is spending the key's budget) holds the fleet for a while that grows
    with the run (not with the strays the window held before it).
    """
    if error.retry_after is not None:
        svc.limiter.block(error.retry_after)
    elif recent.rate_limited_run:
        run = recent.rate_limited_run_length
        svc.limiter.block(RATE_LIMITED_RUN_HOLD_S * run)
        logger.warning(
            "upstream answered 429 %d times in a run: every worker holds sends for this key "
            "for %.0fs (or until `remixq resume`)",
            run,
            RATE_LIMITED_RUN_HOLD_S * run,
        )
