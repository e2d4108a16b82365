"""The poll schedule: when a job accepted upstream is asked about next.

The first poll comes ``REMIX_POLL_INITIAL_S`` after acceptance (``REMIX_CALLBACK_POLL_S``
with callbacks on: polls are then the safety net), each next one :data:`POLL_GROWTH`
times later, up to ``REMIX_POLL_MAX_S``. The dispatcher sends polls in batches
(:data:`worker.fleet.dispatcher.POLL_BATCH_SIZE`). See docs/design.md.
"""

from __future__ import annotations

from worker.settings import Settings

#: Each poll waits this much longer than the one before, up to the maximum.
POLL_GROWTH = 1.5


def poll_delay(hop: int, *, initial: float, maximum: float) -> float:
    """Delay before poll number ``hop`` (1 for the first poll after submission)."""
    return min(maximum, initial * POLL_GROWTH ** max(hop - 1, 0))


def first_poll_s(settings: Settings, *, callbacks: bool = True) -> float:
    """The wait before a new task's first poll (``callbacks``: the upstream may call back,
    so polls come later when callbacks are on)."""
    if callbacks and settings.callbacks_enabled:
        return settings.remix_callback_poll_s
    return settings.remix_poll_initial_s


def next_poll_delay(settings: Settings, polls: int, *, callbacks: bool) -> float:
    """The wait before the next poll of a job polled ``polls`` times; with callbacks on
    (``callbacks``), polls are a slow safety net."""
    delay = poll_delay(
        polls + 1, initial=settings.remix_poll_initial_s, maximum=settings.remix_poll_max_s
    )
    if callbacks and settings.callbacks_enabled:
        delay = max(delay, settings.remix_callback_poll_s)
    return delay
