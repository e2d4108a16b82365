"""The one retry policy: what an error does to a step, and how long the step waits.

* :data:`SUBMIT_ACTIONS`, the family -> action table of a createTask (the families are
  :class:`worker.upstreams.errors.Family`; a ``Retry-After`` is capped where it is parsed,
  :data:`worker.upstreams.errors.MAX_RETRY_AFTER_S`);
* :func:`full_jitter`, the backoff every step uses, :func:`submit_retry_delay` and
  :func:`key_hold_delay` (a job held for its key);
* :func:`poll_error_delay`, a recordInfo error (a job accepted upstream is polled again);
* :func:`side_work_try`, one try of a completion webhook or an archive copy.

See docs/design.md (retries) and docs/architecture.md.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from dataclasses import dataclass

from worker.limits.pause import MAX_PROBE_INTERVAL_S
from worker.settings import Settings
from worker.upstreams.errors import Family, UpstreamError


class Action(enum.Enum):
    """What a step does after an error."""

    #: Try again after a backoff; each try spends one of ``REMIX_MAX_RETRIES``.
    RETRY = "retry"
    #: The whole key is refused (402, 455): wait without spending a retry.
    HOLD_FOR_KEY = "hold_for_key"
    #: The job fails with the error's code.
    FAIL = "fail"


SUBMIT_ACTIONS: Mapping[Family, Action] = {
    Family.RETRY: Action.RETRY,
    Family.KEY: Action.HOLD_FOR_KEY,
    Family.PERMANENT: Action.FAIL,
}


def submit_action(exc: UpstreamError) -> Action:
    return SUBMIT_ACTIONS[exc.family]


def full_jitter(
    retry: int, *, base: float, cap: float, floor: float = 0.0, rng: random.Random | None = None
) -> float:
    """Delay before retry number ``retry`` (0 for the first retry).

    Full jitter: uniform in ``[0, min(cap, base * 2**retry)]``, so that many
    workers failing together do not retry together. ``floor`` (for example an
    upstream ``Retry-After``) raises the result; nothing exceeds ``cap``.
    """
    ceiling = min(cap, base * (2 ** min(retry, 32)))
    delay = (rng or random).uniform(0, ceiling)
    return min(cap, max(delay, floor))


def gives_up(retries: int, settings: Settings) -> bool:
    """Whether retry number ``retries`` (from 1) is past ``REMIX_MAX_RETRIES``."""
    return retries > settings.remix_max_retries


def submit_retry_delay(retries: int, settings: Settings, retry_after: float | None) -> float:
    """The wait before createTask retry number ``retries`` (from 1)."""
    return full_jitter(
        retries - 1,
        base=settings.remix_retry_base_s,
        cap=settings.remix_retry_max_s,
        floor=retry_after or 0.0,
    )


def key_hold_delay(holds: int, settings: Settings, *, alone: bool = False) -> float:
    """The wait of a job held for its key (a 402 or a 455; no retry spent), after
    ``holds`` earlier holds. ``alone``: a 402 that is the job's own (the key has credits),
    retried like a pause probe, from ``REMIX_PAUSE_PROBE_S`` doubling up to 5 minutes."""
    if alone:
        probe = settings.remix_pause_probe_s
        return full_jitter(holds, base=probe, cap=MAX_PROBE_INTERVAL_S, floor=probe)
    return full_jitter(holds, base=settings.remix_retry_base_s, cap=settings.remix_retry_max_s)


def poll_error_delay(next_delay: float, retry_after: float | None, settings: Settings) -> float:
    """The wait after a failed recordInfo: the poll schedule's, or longer when the upstream
    asks (``Retry-After``), but never longer than the longest poll interval."""
    return max(next_delay, min(retry_after or 0.0, settings.remix_poll_max_s))


@dataclass(frozen=True)
class SideWorkTry:
    """How one try of a webhook or an archive copy ends: ``done``, ``retry`` (after
    ``retry_in`` seconds) or ``failed``."""

    outcome: str
    retry_in: float = 0.0


def side_work_try(
    attempts: int,
    *,
    failed: bool,
    permanent: bool,
    most: int,
    base: float,
    cap: float,
) -> SideWorkTry:
    """Decide try number ``attempts`` (from 1): ``failed`` says whether it failed,
    ``permanent`` whether no other try can mend it, ``most`` how many tries there may be."""
    if not failed:
        return SideWorkTry("done")
    if permanent or attempts >= most:
        return SideWorkTry("failed")
    return SideWorkTry("retry", full_jitter(attempts - 1, base=base, cap=cap))
