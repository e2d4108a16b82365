"""Archiving in Redis: the archive schedule, its tokens and leases, the outcomes.

The script that finishes a succeeded job puts it in the schedule (``keys.ARCHIVE_SCHEDULE``)
when archiving is on; :meth:`ArchiveSchedule.claim` (``claim_archive.lua``) hands due
entries out with a token and a lease that grows with the images
(:func:`archive_lease_per_image_s`); ``archive_end.lua`` records an outcome, writes nothing
but the archive's fields, and makes the job's webhook due once archiving has ended. What
this shares with the webhooks is in :mod:`worker.store.side_work`.

The design: docs/design.md, "Result archiving".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from worker import keys
from worker.models import Archive, ArchivedImage, JobRecord
from worker.settings import Settings
from worker.store.jobs import decode_text
from worker.store.side_work import HasJobStore, PerClient, SideSchedule

#: The entry's token: only the message carrying the latest one may archive.
ARCHIVE_TOKEN_FIELD = "_archive_token"
#: At most this many entries claimed per round trip.
ARCHIVE_CLAIM_LIMIT = 100
#: A step's lease, per result image: its download's deadline plus this for writing it.
STORE_WRITE_S = 60.0
#: And for the Redis work around the step.
ARCHIVE_LEASE_MARGIN_S = 30.0
#: Longest pause of an entry held back by the fleet-wide limit (see ``claim_archive.lua``).
ARCHIVE_HOLD_MAX_S = 10.0


def archive_lease_per_image_s(settings: Settings) -> float:
    """How much longer a step's lease is per result image (``claim_archive.lua`` adds
    :data:`ARCHIVE_LEASE_MARGIN_S`): one download, then one write to the archive."""
    return settings.remix_archive_timeout_s + STORE_WRITE_S


@dataclass(frozen=True)
class ArchiveDispatch:
    """An entry handed out by the schedule: archive the job with this token."""

    job_id: str
    token: int
    #: Sent again because its previous message or step was lost.
    resent: bool = False


@dataclass(frozen=True)
class ArchiveTarget:
    """What one step needs: the public record now and the current token."""

    record: JobRecord
    token: int


class ArchiveSchedule(SideSchedule[ArchiveDispatch]):
    """Claims due archiving, reads what a step needs and records outcomes.

    Parameters:
        client: a redis-py client for the result backend's database (job records).
    """

    SCHEDULE = keys.ARCHIVE_SCHEDULE
    IN_FLIGHT = keys.ARCHIVE_IN_FLIGHT
    OTHER_IN_FLIGHT = keys.NOTIFY_IN_FLIGHT
    TOKEN_FIELD = ARCHIVE_TOKEN_FIELD
    CLAIM_SCRIPT = "claim_archive"
    END_SCRIPT = "archive_end"
    CLAIM_WIDTH = 3

    def _claim_args(self, settings: Settings) -> tuple[float, list[Any]]:
        return ARCHIVE_HOLD_MAX_S, [archive_lease_per_image_s(settings), ARCHIVE_LEASE_MARGIN_S]

    def _dispatch(self, values: list[Any]) -> ArchiveDispatch:
        job_id, token, lost = values
        return ArchiveDispatch(
            job_id=decode_text(job_id), token=int(token), resent=decode_text(lost) == "1"
        )

    def due_now(self, items: list[ArchiveDispatch]) -> None:
        """Make claimed entries due at once: their messages never left (broker refused)."""
        if items:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zadd(keys.ARCHIVE_SCHEDULE, {item.job_id: 0 for item in items}, xx=True)
            pipe.zrem(keys.ARCHIVE_IN_FLIGHT, *(item.job_id for item in items))
            pipe.execute()

    def target(self, job_id: str) -> ArchiveTarget | None:
        """The job's public record and archive token (None: no such job)."""
        found = self._read(job_id)
        return None if found is None else ArchiveTarget(record=found[0], token=found[2])

    def end(
        self,
        job_id: str,
        token: int,
        outcome: str,
        archive: Archive | None = None,
        archived: list[ArchivedImage] | None = None,
        retry_in: float = 0.0,
    ) -> str:
        """Record a step's ``outcome`` (see ``archive_end.lua`` for it and the answer)."""
        entries = "" if archived is None else json.dumps([a.model_dump() for a in archived])
        args = [
            job_id,
            token,
            outcome,
            "" if archive is None else archive.model_dump_json(),
            entries,
            max(0.0, retry_in),
        ]
        job_keys = [
            keys.job(job_id),
            keys.ARCHIVE_SCHEDULE,
            keys.NOTIFY_SCHEDULE,
            keys.ARCHIVE_IN_FLIGHT,
        ]
        return self._ended(job_keys, args)


_schedules = PerClient(ArchiveSchedule)


def archive_schedule(svc: HasJobStore) -> ArchiveSchedule:
    """The archive schedule on ``svc``'s job records (built once per Redis client)."""
    return _schedules.get(svc.store.redis)
