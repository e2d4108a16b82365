"""Section 1: accepted createTask/s against the key's budget, for growing fleets.

The sandbox enforces the same budget the workers are told, and refuses the excess with
429; a fleet-wide limiter keeps every worker of the fleet inside it, so the accepted
rate stays at the budget and no 429 comes back, however many workers share the key.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from bench.report import Figure, ratio
from bench.sections.common import (
    CONCURRENCY,
    STATS_POLL_S,
    Run,
    enqueue_jobs,
    job_states,
)
from sandbox.control import SandboxControl
from worker.settings import parse_rate_limit

SECTION = "1 rate limit"
#: The upstream budget of this section, on both sides.
RATE_LIMIT = "20/10s"


@dataclass(frozen=True)
class RateMeasurement:
    """Accepted createTask per second over a steady window, and the 429s around it.

    :param rate: accepted createTask per second.
    :param accepted: acceptances the rate is based on.
    :param span: seconds they spanned.
    :param saturated: whether the window was filled (else the rate is a plain count).
    :param rate_limited: 429 answers from the first enqueue to the end of the window.
    :param create_requests: createTask requests in the same time.
    :param seconds: that time.
    """

    rate: float
    accepted: int
    span: float
    saturated: bool
    rate_limited: int
    create_requests: int
    seconds: float


def measure_acceptance(
    control: SandboxControl, started: float, *, limit: int, warmup: float, window: float
) -> RateMeasurement:
    """Watch the sandbox's acceptances until ``window`` seconds of steady state are seen.

    The window starts at the first acceptance at least ``warmup`` seconds after the
    first one (past the initial burst). The rate is ``k / (t[i + k] - t[i])`` with
    ``k`` a whole number of limit windows' worth of requests: ``i`` and ``i + k`` are
    then in the same phase of any bursty pattern the limit produces, so a fleet
    that uses its whole budget scores exactly the allowed rate and never more.
    """
    periods = max(1, math.floor(window / parse_rate_limit(RATE_LIMIT)[1]))
    needed = limit * periods
    deadline = started + warmup + window * 1.5 + 15.0
    while True:
        stats = control.stats()
        accepted = sorted(stats["accepted_at"])
        start_index = _first_after(accepted, accepted[0] + warmup) if accepted else None
        now = time.time()
        if start_index is not None and len(accepted) > start_index + needed:
            first, last = accepted[start_index], accepted[start_index + needed]
            return RateMeasurement(
                needed / (last - first),
                needed,
                last - first,
                True,
                int(stats["rate_limited"]),
                int(stats["create_requests"]),
                now - started,
            )
        if now >= deadline:
            break
        time.sleep(STATS_POLL_S)
    if start_index is None:
        return RateMeasurement(
            0.0, 0, 0.0, False, stats["rate_limited"], stats["create_requests"], now - started
        )
    first = accepted[start_index]
    span = min(window, now - first)
    count = sum(1 for t in accepted[start_index:] if t < first + span)
    return RateMeasurement(
        count / span if span > 0 else 0.0,
        count,
        span,
        False,
        int(stats["rate_limited"]),
        int(stats["create_requests"]),
        now - started,
    )


def _first_after(ordered: Sequence[float], moment: float) -> int | None:
    return next((i for i, t in enumerate(ordered) if t >= moment), None)


def rate_limit_section(run: Run) -> list[Figure]:
    """Accepted createTask/s against the key's budget, for growing fleets."""
    stack, plan = run.stack, run.plan
    limit, window = parse_rate_limit(RATE_LIMIT)
    allowed = limit / window
    # Enough jobs that the key stays saturated past the longest measurement.
    jobs = math.ceil(allowed * (plan.rate_warmup_s + plan.rate_window_s * 1.5) * 1.5) + limit
    sandbox = stack.start_sandbox(["--generation-seconds", "1", "--rate-limit", RATE_LIMIT])
    control = SandboxControl(sandbox.url or "")
    figures: list[Figure] = []
    try:
        for fleet in plan.rate_fleets:
            stack.flush()
            control.reset()
            workers = stack.start_workers(
                sandbox, fleet, concurrency=CONCURRENCY, settings={"KIE_RATE_LIMIT": RATE_LIMIT}
            )
            try:
                batch = enqueue_jobs(jobs, f"bench rate limit {fleet}")
                result = measure_acceptance(
                    control,
                    batch.started,
                    limit=limit,
                    warmup=plan.rate_warmup_s,
                    window=plan.rate_window_s,
                )
                states = Counter(job_states(batch.ids).values())
            finally:
                stack.stop(workers)
            figures += _fleet_figures(fleet, jobs, allowed, result, states)
    finally:
        control.close()
        stack.stop([sandbox])
    return figures


def _fleet_figures(
    fleet: int, jobs: int, allowed: float, result: RateMeasurement, states: Counter[str]
) -> list[Figure]:
    """The two rows of one fleet: accepted createTask/s and 429 answers."""
    label = f"{fleet} worker{'s' if fleet > 1 else ''} x {CONCURRENCY}"
    note = (
        f"{result.accepted} acceptances over {result.span:.1f} s"
        if result.saturated
        else f"key not saturated: {result.accepted} acceptances in {result.span:.1f} s"
    )
    if states.get("failed"):
        note += f"; {states['failed']} of {jobs} jobs failed by the end of the window"
    return [
        Figure(
            SECTION,
            f"{label}: accepted createTask/s",
            f"{result.rate:.2f}/s",
            f"{allowed:.2f}/s allowed ({RATE_LIMIT})",
            ratio(result.rate, allowed, percent=True),
            note,
        ),
        Figure(
            SECTION,
            f"{label}: 429 answers",
            f"{result.rate_limited}",
            "0",
            "",
            f"{result.rate_limited} of {result.create_requests} createTask requests "
            f"in {result.seconds:.0f} s were answered 429",
        ),
    ]
