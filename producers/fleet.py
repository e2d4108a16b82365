"""The operator's view of the fleet, and the pause switch (``remixq status``/``pause``/``resume``).

Budgets and pauses are kept per API key. Workers register the (non-secret) id of the key
they use, so an operator's shell needs no secret to see or switch them; with
``KIE_API_KEY`` set, that key is included too.
"""

from __future__ import annotations

from typing import Any

from worker import keys
from worker.app import services
from worker.fields import PRIORITIES
from worker.fleet.dispatcher import queues_without_workers
from worker.fleet.registry import known_api_keys, limiter_for, pause_for, spend_cap_for
from worker.models import PROVIDERS
from worker.policies.gates import resume_key
from worker.store.publisher import ARCHIVE_QUEUE, NOTIFY_QUEUE, POLL_QUEUE, SUBMIT_QUEUE

#: Where the Redis transport keeps delivered but unacknowledged messages.
UNACKED_HASH = "unacked"
#: The sends per minute and the shares of the budget are taken over this many minutes.
SHARE_MINUTES = 5


def tenant_lines() -> list[dict[str, Any]]:
    """Per provider, priority and tenant: jobs waiting in line, the oldest one's wait,
    sends per minute and the share of the provider's sends over :data:`SHARE_MINUTES`
    (highest priority first; tenants with recent sends and none waiting too)."""
    svc = services()
    now = svc.clock.now()
    rows = []
    for provider in PROVIDERS:
        waiting = {(v.priority, v.tenant): v for v in svc.lines.view(provider)}
        picks = svc.lines.picks(provider, SHARE_MINUTES, now)
        total = sum(picks.values())
        order = {p: i for i, p in enumerate(PRIORITIES)}
        for priority, tenant in sorted(
            set(waiting) | set(picks), key=lambda pt: (order.get(pt[0], len(order)), pt[1])
        ):
            line = waiting.get((priority, tenant))
            oldest = line.oldest_created_at if line else None
            sent = picks.get((priority, tenant), 0)
            rows.append(
                {
                    "provider": provider,
                    "priority": priority,
                    "tenant": tenant,
                    "waiting": line.waiting if line else 0,
                    "oldest_wait_s": round(max(0.0, now - oldest), 1) if oldest else 0.0,
                    "sends_per_minute": round(sent / SHARE_MINUTES, 2),
                    "budget_share": round(sent / total, 3) if total else 0.0,
                }
            )
    return rows


def _jobs_by_state() -> dict[str, int]:
    """Jobs by state, from the state indexes (finished states may still count records
    that expired recently: their index entries are pruned later)."""
    counts = services().store.count_by_state()
    return {state: count for state, count in counts.items() if count}


def _key_status(key_id: str, rate_limit: str) -> dict[str, Any]:
    usage = limiter_for(services(), key_id, rate_limit).usage()
    pause = pause_for(services(), key_id).state()
    return {
        "key_id": key_id,
        "rate_limit": rate_limit,
        "sent_in_window": usage.used_in_window,
        "granted_unused": usage.granted_unused,
        "blocked_for_s": round(usage.blocked_for, 2),
        "spend": _spend_status(key_id),
        "paused": None
        if pause is None
        else {"reason": pause.reason, "message": pause.message, "since": pause.since_s},
    }


def _spend_status(key_id: str) -> list[dict[str, Any]]:
    """Per window of the key's spend cap (none: no cap): createTasks that were or may have
    been accepted in it (unknown outcomes count), its limit, and reservations ahead."""
    return [
        {
            "window_s": usage.window,
            "limit": usage.limit,
            "spent": usage.spent,
            "reserved_ahead": usage.reserved_ahead,
        }
        for usage in spend_cap_for(services(), key_id).usage()
    ]


def fleet_status() -> dict[str, Any]:
    """Queue depths, jobs by state, in flight upstream, each key's budget and pause."""
    svc = services()
    by_state = _jobs_by_state()
    return {
        "queues": {
            name: svc.broker.llen(name)
            for name in (SUBMIT_QUEUE, POLL_QUEUE, NOTIFY_QUEUE, ARCHIVE_QUEUE)
        },
        "webhooks_pending": svc.store.redis.zcard(keys.NOTIFY_SCHEDULE),
        "archives_pending": svc.store.redis.zcard(keys.ARCHIVE_SCHEDULE),
        "queues_without_workers": queues_without_workers(svc),
        "held_by_workers": svc.broker.hlen(UNACKED_HASH),
        "scheduled": svc.store.schedule_size(),
        "jobs_by_state": dict(sorted(by_state.items())),
        "in_flight_upstream": by_state.get("submitted", 0) + by_state.get("running", 0),
        "keys": [_key_status(k, limit) for k, limit in sorted(known_api_keys(services()).items())],
        "lines": tenant_lines(),
        "metrics": svc.metrics.read(),
    }


def pause_submissions(message: str) -> list[str]:
    """Hold every submission until :func:`resume_submissions`; returns the key ids paused."""
    key_ids = sorted(known_api_keys(services()))
    for key_id in key_ids:
        pause_for(services(), key_id).pause_by_operator(message)
    return key_ids


def resume_submissions() -> list[str]:
    """End every pause and every hold after a 429, and wake every job waiting for a key.

    Returns the ids of the keys that were paused or held.
    """
    store = services().store
    return [
        key_id
        for key_id, rate_limit in sorted(known_api_keys(services()).items())
        if resume_key(
            store,
            pause_for(services(), key_id),
            limiter_for(services(), key_id, rate_limit),
            key_id,
            services().settings.remix_submit_deadline_s,
        )
    ]
