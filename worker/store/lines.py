"""The waiting lines: jobs waiting for a send moment of their provider's key.

One sorted set per provider, priority and tenant holds the jobs by place (when they were
created); ``lines.lua`` keeps them and each tenant's pass, ``pick.lua`` gives the moments
the budget grants to the next jobs, ``line_join.lua`` puts a job back at its place. The
order (strict between priorities, weighted fair share between tenants, first in first
out inside one): docs/design.md, "Sharing the key's send moments".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from worker import keys
from worker.fields import PRIORITIES
from worker.lua import load_script
from worker.settings import Settings
from worker.store.jobs import Dispatch, Job, decode_text, dispatches, encode_fields

#: A job still in line at its submit deadline is handed out this long after it, to fail.
DEADLINE_MARGIN_S = 1.0


def backstop_s(settings: Settings) -> float:
    """When the schedule hands out a new job still waiting in line: its submit deadline."""
    return settings.remix_submit_deadline_s + DEADLINE_MARGIN_S


@dataclass(frozen=True)
class LineView:
    """One tenant's line in one priority class: how many wait, since when the oldest."""

    provider: str
    priority: str
    tenant: str
    waiting: int
    oldest_created_at: float | None


class WaitingLines:
    """Reads and writes the waiting lines (in the job store's Redis).

    Parameters:
        client: the job store's Redis client.
        ttl_s: how long a job record lives after its last write.
    """

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._join = load_script(client, "line_join")
        self._pick = load_script(client, "pick")

    def join(self, job: Job, deadline_in: float, **fields: Any) -> int:
        """Put the job back in its line at its place (if ``job``'s token is current); the
        schedule hands it out after ``deadline_in`` s if it is still waiting. Returns 1 in
        line, 0 not queued (or has a task), -1 missing, -2 stale token."""
        args = [
            job.job_id,
            job.token,
            max(0.0, deadline_in),
            self.ttl_s,
            keys.LINES_PREFIX,
            *encode_fields(fields),
        ]
        return int(self._join(keys=[keys.job(job.job_id), keys.SCHEDULE], args=args))

    def pick(
        self,
        provider: str,
        grants: Sequence[str],
        weights: Mapping[str, float],
        lease_s: float,
    ) -> list[Dispatch]:
        """Give each granted moment to the next job in ``provider``'s lines and hand the
        job out (``pick.lua``); fewer jobs than moments when the lines run out."""
        if not grants:
            return []
        flat_weights = [str(v) for tenant, w in weights.items() for v in (tenant, w)]
        args = [
            keys.JOB_PREFIX,
            keys.lines_base(provider),
            lease_s,
            len(weights),
            *flat_weights,
            *grants,
        ]
        return dispatches(self._pick(keys=[keys.SCHEDULE], args=args))

    def waiting(self, providers: Sequence[str]) -> dict[str, int]:
        """How many jobs wait in each provider's lines (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for provider in providers:
            pipe.get(keys.lines_count(provider))
        return {p: max(0, int(n or 0)) for p, n in zip(providers, pipe.execute(), strict=True)}

    def view(self, provider: str) -> list[LineView]:
        """Every tenant's line of ``provider``, highest priority first."""
        tenants: list[tuple[str, str]] = []
        for priority in PRIORITIES:
            members = self.redis.zrange(keys.line_tenants(provider, priority), 0, -1)
            tenants += [(priority, decode_text(m)) for m in members]
        pipe = self.redis.pipeline(transaction=False)
        for priority, tenant in tenants:
            pipe.zcard(keys.line(provider, priority, tenant))
            pipe.zrange(keys.line(provider, priority, tenant), 0, 0, withscores=True)
        replies = pipe.execute()
        views = []
        for (priority, tenant), size, head in zip(
            tenants, replies[0::2], replies[1::2], strict=True
        ):
            oldest = float(head[0][1]) if head else None
            views.append(LineView(provider, priority, tenant, int(size), oldest))
        return views

    def picks(self, provider: str, minutes: int, now: float) -> dict[tuple[str, str], int]:
        """Jobs picked per ``(priority, tenant)`` over the last ``minutes`` whole minutes
        and the current one."""
        current = math.floor(now / 60)
        pipe = self.redis.pipeline(transaction=False)
        for minute in range(current - minutes, current + 1):
            pipe.hgetall(keys.lines_picks(provider, minute))
        counts: dict[tuple[str, str], int] = {}
        for reply in pipe.execute():
            for field, value in reply.items():
                priority, _, tenant = decode_text(field).partition(":")
                counts[(priority, tenant)] = counts.get((priority, tenant), 0) + int(value)
        return counts
