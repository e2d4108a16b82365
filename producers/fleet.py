"""The operator's view of the fleet, and the pause switch (``remixq status``/``pause``/``resume``).

Budgets and pauses are kept per API key. Workers register the (non-secret) id
of the key they use, so an operator's shell needs no secret to see or switch
them; with ``KIE_API_KEY`` set, that key is included too.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from worker.app import POLL_QUEUE, SUBMIT_QUEUE
from worker.jobstore import JOB_KEY, decode_text
from worker.pause import METRICS_KEY
from worker.runtime import broker_redis, job_store, known_api_keys, limiter_for, pause_for

#: Records read for the counts by state (a fleet holds far fewer live records).
MAX_RECORDS_SCANNED = 200_000
SCAN_BATCH = 1_000
#: Where the Redis transport keeps delivered but unacknowledged messages
#: (including countdown messages a worker holds until they are due).
UNACKED_HASH = "unacked"


def _jobs_by_state() -> Counter[str]:
    counts: Counter[str] = Counter()
    batch: list[bytes] = []
    keys = job_store().redis.scan_iter(JOB_KEY.format("*"), count=SCAN_BATCH)
    for seen, key in enumerate(keys):
        if seen >= MAX_RECORDS_SCANNED:
            break
        batch.append(key)
        if len(batch) == SCAN_BATCH:
            counts.update(_states(batch))
            batch = []
    counts.update(_states(batch))
    return counts


def _states(keys: list[bytes]) -> list[str]:
    pipe = job_store().redis.pipeline(transaction=False)
    for key in keys:
        pipe.hget(key, "state")
    return [json.loads(raw) for raw in pipe.execute() if raw is not None]


def _key_status(key_id: str, rate_limit: str) -> dict[str, Any]:
    usage = limiter_for(key_id, rate_limit).usage()
    pause = pause_for(key_id).state()
    return {
        "key_id": key_id,
        "rate_limit": rate_limit,
        "sent_in_window": usage.used_in_window,
        "reserved_ahead": usage.reserved_ahead,
        "blocked_for_s": round(usage.blocked_for, 2),
        "paused": None
        if pause is None
        else {"reason": pause.reason, "message": pause.message, "since": pause.since},
    }


def fleet_status() -> dict[str, Any]:
    """Queue depths, jobs by state, in flight upstream, each key's budget and pause."""
    broker = broker_redis()
    by_state = _jobs_by_state()
    return {
        "queues": {name: broker.llen(name) for name in (SUBMIT_QUEUE, POLL_QUEUE)},
        "held_by_workers": broker.hlen(UNACKED_HASH),
        "jobs_by_state": dict(sorted(by_state.items())),
        "in_flight_upstream": by_state["submitted"] + by_state["running"],
        "keys": [_key_status(k, limit) for k, limit in sorted(known_api_keys().items())],
        "metrics": {decode_text(k): int(v) for k, v in broker.hgetall(METRICS_KEY).items()},
    }


def pause_submissions(message: str) -> list[str]:
    """Hold every submission until :func:`resume_submissions`; returns the key ids paused."""
    key_ids = sorted(known_api_keys())
    for key_id in key_ids:
        pause_for(key_id).pause_by_operator(message)
    return key_ids


def resume_submissions() -> list[str]:
    """Clear every pause (an operator's or an automatic one); returns the key ids resumed."""
    return [key_id for key_id in sorted(known_api_keys()) if pause_for(key_id).resume()]
