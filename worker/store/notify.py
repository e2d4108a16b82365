"""Completion webhooks in Redis: the notify schedule, each receiver's limit, the outcomes.

The script that finishes a job (or, for a job being archived, the one that ends its
archiving) puts its webhook in the schedule (``keys.NOTIFY_SCHEDULE``);
:meth:`NotifyStore.claim` (``claim_notify.lua``) hands due ones out with a token and a
lease, within each receiver's limit (up to :data:`MOST_IN_FLIGHT_PER_RECEIVER`) and the
fleet's; ``notify_end.lua`` records an outcome and writes nothing but the webhook's fields.
What this shares with archiving is in :mod:`worker.store.side_work`.

The design (at least once, the limits, the lease): docs/design.md, "Completion webhooks".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from worker import keys
from worker.lua import load_script
from worker.models import JobRecord, Notification
from worker.settings import Settings
from worker.store.jobs import NOTIFY_URL_FIELD, decode_text
from worker.store.side_work import HasJobStore, PerClient, SideSchedule

#: The webhook's token: only the message carrying the latest one may deliver.
NOTIFY_TOKEN_FIELD = "_notify_token"
#: At most this many webhooks claimed per round trip.
NOTIFY_CLAIM_LIMIT = 200
#: A delivery's lease is its total timeout plus this, for the Redis work around it.
NOTIFY_LEASE_MARGIN_S = 10.0
#: Most deliveries in flight to one receiver that has been answering 2xx.
MOST_IN_FLIGHT_PER_RECEIVER = 8
#: How long a receiver's streak of good answers is remembered after its last delivery.
RECEIVER_TTL_S = 86400


def notify_lease_s(settings: Settings) -> float:
    """How long one delivery may take before the schedule sends the webhook again."""
    return settings.remix_notify_timeout_s + NOTIFY_LEASE_MARGIN_S


@dataclass(frozen=True)
class NotifyDispatch:
    """A webhook handed out by the schedule: deliver it with this token."""

    job_id: str
    token: int
    #: ``scheme://host:port`` of the URL, lower case: whose in-flight limit it counts in.
    receiver: str
    due: float
    #: Sent again because its previous message or delivery was lost.
    resent: bool = False


@dataclass(frozen=True)
class NotifyTarget:
    """What one delivery needs: the public record now, the URL and the current token."""

    record: JobRecord
    url: str | None
    token: int


class NotifyStore(SideSchedule[NotifyDispatch]):
    """Claims webhooks, reads what a delivery needs and records outcomes.

    Parameters:
        client: a redis-py client for the result backend's database (job records).
    """

    SCHEDULE = keys.NOTIFY_SCHEDULE
    IN_FLIGHT = keys.NOTIFY_IN_FLIGHT
    OTHER_IN_FLIGHT = keys.ARCHIVE_IN_FLIGHT
    TOKEN_FIELD = NOTIFY_TOKEN_FIELD
    CLAIM_SCRIPT = "claim_notify"
    END_SCRIPT = "notify_end"
    CLAIM_WIDTH = 5

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client)
        self._unsent = load_script(client, "notify_unsent")

    def _claim_args(self, settings: Settings) -> tuple[float, list[Any]]:
        own = [
            notify_lease_s(settings),
            keys.NOTIFY_RECEIVER_PREFIX,
            keys.NOTIFY_BUSY_PREFIX,
            MOST_IN_FLIGHT_PER_RECEIVER,
        ]
        return settings.remix_notify_timeout_s, own

    def _dispatch(self, values: list[Any]) -> NotifyDispatch:
        job_id, token, receiver, due, lost = values
        return NotifyDispatch(
            job_id=decode_text(job_id),
            token=int(token),
            receiver=decode_text(receiver),
            due=float(due),
            resent=decode_text(lost) == "1",
        )

    def unsent(self, items: list[NotifyDispatch]) -> int:
        """Make claimed webhooks due at once: their messages never left (broker refused)."""
        if not items:
            return 0
        args: list[Any] = [keys.JOB_PREFIX, keys.NOTIFY_BUSY_PREFIX]
        for item in items:
            args += [item.job_id, item.token, item.receiver]
        return int(self._unsent(keys=[keys.NOTIFY_SCHEDULE, keys.NOTIFY_IN_FLIGHT], args=args))

    def target(self, job_id: str) -> NotifyTarget | None:
        """The job's public record, webhook URL and webhook token (None: no such job)."""
        found = self._read(job_id)
        if found is None:
            return None
        record, fields, token = found
        url = fields.get(NOTIFY_URL_FIELD)
        return NotifyTarget(record=record, url=url if isinstance(url, str) else None, token=token)

    def end(
        self,
        job_id: str,
        token: int,
        receiver: str,
        outcome: str,
        notification: Notification | None = None,
        retry_in: float = 0.0,
    ) -> str:
        """Record a delivery's ``outcome`` (see ``notify_end.lua`` for it and the answer)."""
        args = [
            job_id,
            token,
            outcome,
            "" if notification is None else notification.model_dump_json(),
            max(0.0, retry_in),
            RECEIVER_TTL_S,
        ]
        job_keys = [
            keys.job(job_id),
            keys.NOTIFY_SCHEDULE,
            keys.notify_receiver(receiver),
            keys.notify_busy(receiver),
            keys.NOTIFY_IN_FLIGHT,
        ]
        return self._ended(job_keys, args)


_stores = PerClient(NotifyStore)


def notify_store(svc: HasJobStore) -> NotifyStore:
    """The webhook store on ``svc``'s job records (built once per Redis client)."""
    return _stores.get(svc.store.redis)
