"""Hands out due side work (completion webhooks, archiving) as Celery messages.

The dispatcher (:mod:`worker.fleet.dispatcher`) calls these after the jobs' own steps;
an error here never keeps a job's step from being sent. See docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from worker.services import Services
from worker.store.archive import ARCHIVE_CLAIM_LIMIT, archive_schedule
from worker.store.notify import NOTIFY_CLAIM_LIMIT, notify_store


def dispatch_notifications(
    svc: Services, oldest_waiting: float | None = None, fleet_slots: int | None = None
) -> int:
    """Claim the due webhooks and publish one ``remix.notify`` each; returns how many.

    Those whose message the broker refused are made due again at once, then the error is
    raised: they are never lost, at worst sent after their lease.
    """
    store = notify_store(svc)
    claimed = store.claim(
        NOTIFY_CLAIM_LIMIT, svc.settings, oldest_waiting=oldest_waiting, fleet_slots=fleet_slots
    )
    if not claimed:
        return 0
    return publish_claimed(
        svc,
        claimed,
        "notify_lease_resends_total",
        lambda item, producer: svc.publisher.notify(
            item.job_id, item.token, item.receiver, producer=producer
        ),
        store.unsent,
    )


def dispatch_archives(
    svc: Services, oldest_waiting: float | None = None, fleet_slots: int | None = None
) -> int:
    """Claim the due archiving and publish one ``remix.archive`` each; returns how many.

    Those whose message the broker refused are made due again at once, then the error is
    raised: they are never lost, at worst sent after their lease.
    """
    schedule = archive_schedule(svc)
    claimed = schedule.claim(
        ARCHIVE_CLAIM_LIMIT, svc.settings, oldest_waiting=oldest_waiting, fleet_slots=fleet_slots
    )
    if not claimed:
        return 0
    return publish_claimed(
        svc,
        claimed,
        "archive_lease_resends_total",
        lambda item, producer: svc.publisher.archive(item.job_id, item.token, producer=producer),
        schedule.due_now,
    )


def publish_claimed(
    svc: Services,
    claimed: Sequence[Any],
    resends_metric: str,
    send: Callable[[Any, Any], None],
    unsent: Callable[[list[Any]], Any],
) -> int:
    """Publish one message per claimed entry (webhooks, archives); returns how many.

    Entries sent again after their lease ran out are counted as ``resends_metric``; those
    whose message the broker refused are handed to ``unsent`` (due again), then the error
    is raised.
    """
    resent = sum(1 for item in claimed if item.resent)
    if resent:
        svc.metrics.count(resends_metric, resent)
    svc.publisher.send_each(claimed, send, unsent)
    return len(claimed)
