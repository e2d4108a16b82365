"""Cancelling a job: the record's script decides, then its spend reservation is given back.

The decision is ``cancel.lua``'s (one atomic step on the job store, against the same
fields the submit claim reads). A job cancelled while it held a spend-cap reservation
never sends, so the reservation goes back to its key's log, and its source files leave
the blob store. That log is in the broker's
Redis (perhaps another server), so this is a second step; reservation ids are unique, so
each known key's log is asked. Best effort: a reservation left behind only makes the
fleet spend less.
"""

from __future__ import annotations

import contextlib

import redis

from worker import keys
from worker.fleet.registry import known_api_keys
from worker.policies.outcome import delete_blobs
from worker.services import Services
from worker.store.jobs import SPEND_FIELD


def cancel(svc: Services, job_id: str) -> str:
    """Cancel a job never sent upstream; the answers are ``cancel.lua``'s."""
    outcome = svc.store.cancel(job_id)
    if outcome == "cancelled":
        give_back_spend(svc, job_id)
        delete_blobs(svc, job_id)
    return outcome


def give_back_spend(svc: Services, job_id: str) -> None:
    with contextlib.suppress(redis.RedisError):
        spend = svc.store.get_internal(job_id, SPEND_FIELD)
        if isinstance(spend, dict) and spend.get("id"):
            for key_id in known_api_keys(svc):
                if svc.broker.zrem(keys.spend_log(key_id), str(spend["id"])):
                    svc.metrics.count("spend_refunds_total")
