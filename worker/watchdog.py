"""A sweep that re-sends the messages of jobs that stopped making progress.

The Redis transport takes a message off the queue (``BRPOP``) and only then
records it as unacknowledged; a worker killed between the two loses that
message for good, and a job would stay ``queued`` (or stop polling) forever.
Celery cannot close that gap, so the pipeline does not rely on it: every
unfinished job carries a deadline for its next sign of progress (a submit or a
poll running), and a sweep running in every worker re-sends the missing
message for any job past it. Duplicates this may create are harmless: the
submit claim drops a second submit, and a job is polled only by its latest
batch.
"""

from __future__ import annotations

from typing import Any, ClassVar

from celery import bootsteps
from celery.utils.log import get_logger

from worker.jobstore import KEY_PREFIX, REQUEST_FIELD
from worker.runtime import job_store
from worker.settings import MAX_COUNTDOWN_S, VISIBILITY_TIMEOUT_S

logger = get_logger(__name__)

#: A job must show progress this often: longer than any countdown and than the
#: broker's own redelivery of a dead worker's messages, so that the sweep only
#: acts on messages that are really gone.
STALL_S = VISIBILITY_TIMEOUT_S + 10
#: Seconds between sweeps in each worker; one worker sweeps at a time.
SWEEP_INTERVAL_S = 10.0
SWEEP_LOCK_KEY = KEY_PREFIX + "lock:watchdog"
SWEEP_BATCH = 500

assert MAX_COUNTDOWN_S * 2 < STALL_S


def sweep() -> int:
    """Re-send the next message of every stalled job; returns how many were re-sent."""
    from worker.tasks import schedule_poll, send_submit

    store = job_store()
    if not store.redis.set(SWEEP_LOCK_KEY, "1", nx=True, ex=int(SWEEP_INTERVAL_S) - 1):
        return 0
    resent = 0
    for job_id in store.stalled(SWEEP_BATCH):
        record = store.get(job_id)
        if record is None or record.finished:
            store.forget_progress(job_id)
            continue
        store.expect_progress(job_id, STALL_S)
        if record.upstream_task_id:
            schedule_poll(job_id, 0)
        else:
            request = store.get_internal(job_id, REQUEST_FIELD)
            if request is None:
                continue
            send_submit(job_id, request)
        logger.warning("watchdog: job %s (%s) stalled; re-sent its message", job_id, record.state)
        resent += 1
    return resent


def _safe_sweep() -> None:
    try:
        sweep()
    except Exception:  # a sweep must never take the worker down
        logger.exception("watchdog sweep failed")


class WatchdogStep(bootsteps.StartStopStep):
    """Runs :func:`sweep` on the worker's timer."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Timer"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def start(self, parent: Any) -> None:
        self.tref = parent.timer.call_repeatedly(SWEEP_INTERVAL_S, _safe_sweep, priority=10)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
