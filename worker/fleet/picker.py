"""The send moments of each upstream key -> the jobs waiting in its lines.

A dispatcher round asks the key's budget for moments when jobs wait
(:meth:`~worker.limits.ratelimit.SharedRateLimiter.grant`), gives them to the next jobs
(:meth:`~worker.store.lines.WaitingLines.pick`) and hands back the moments no job took.
It asks again when the budget says another moment may be free, not every round. The
order: docs/design.md, "Sharing the key's send moments".
"""

from __future__ import annotations

import time
import uuid

from worker.services import Services
from worker.store.jobs import Dispatch
from worker.upstreams.providers import configured_providers

#: At most this many jobs picked per round trip.
PICK_LIMIT = 500
#: A round asks the budget again at least this often while jobs wait (a hold after a 429
#: or a pause may end early: an operator's resume).
RECHECK_S = 1.0


class Picker:
    """Picks jobs for the send moments of every upstream this worker can send to."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.providers = configured_providers(svc.settings)
        self._next_at: dict[str, float] = {}

    def wanted(self, waiting: dict[str, int]) -> list[str]:
        """The providers with jobs waiting whose budget may have a moment free now."""
        now = time.monotonic()
        return [p for p in self.providers if waiting.get(p) and self._next_at.get(p, 0) <= now]

    def seconds_to_next(self, waiting: dict[str, int]) -> float | None:
        """How long until a provider with waiting jobs may have a moment (None: none wait)."""
        times = [self._next_at.get(p, 0.0) for p in self.providers if waiting.get(p)]
        return max(0.0, min(times) - time.monotonic()) if times else None

    def orphans(self, waiting: dict[str, int]) -> list[str]:
        """Providers this worker cannot send to whose lines hold jobs (whether another
        worker can is the caller's to find out)."""
        return [p for p, count in waiting.items() if count and p not in self.providers]

    def hand_out_orphans(self, provider: str, waiting: int) -> list[Dispatch]:
        """Hand out jobs of a provider no live worker can send, without a send moment:
        their step fails them (``provider_not_configured``) instead of leaving them in line
        until their submit deadline."""
        members = [f"none:{uuid.uuid4().hex}:{i}" for i in range(min(waiting, PICK_LIMIT))]
        return self.svc.lines.pick(provider, members, {}, self.svc.settings.lease_s)

    def wait(self, providers: list[str], seconds: float) -> None:
        """Ask no budget for ``providers`` for ``seconds`` (the fleet has no room now)."""
        for provider in providers:
            self._next_at[provider] = time.monotonic() + seconds

    def pick(self, provider: str, waiting: int, room: int = PICK_LIMIT) -> list[Dispatch]:
        """Moments for up to ``waiting`` of ``provider``'s jobs, given to the next in line;
        at most ``room`` (what the fleet can start before the moments go stale)."""
        svc = self.svc.for_provider(provider)
        grants = svc.limiter.grant(waiting, min(PICK_LIMIT, room), svc.spend.windows)
        self._next_at[provider] = time.monotonic() + min(grants.next_in, RECHECK_S)
        if not grants.members:
            return []
        picked = svc.lines.pick(
            provider, grants.members, svc.settings.tenant_weights, svc.settings.lease_s
        )
        unused = grants.members[len(picked) :]
        if unused:
            svc.limiter.give_back(unused)
            self._next_at[provider] = 0.0
        return picked
