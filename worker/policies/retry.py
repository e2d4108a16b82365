"""Delays between attempts: exponential backoff with full jitter, and the poll schedule."""

from __future__ import annotations

import random

#: Each poll waits this much longer than the one before, up to the maximum.
POLL_GROWTH = 1.5


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


def poll_delay(hop: int, *, initial: float, maximum: float) -> float:
    """Delay before poll number ``hop`` (1 for the first poll after submission)."""
    return min(maximum, initial * POLL_GROWTH ** max(hop - 1, 0))
