"""One createTask budget per API key, shared by every worker on every host.

The dispatchers ask for send moments when jobs wait (``grant.lua``): as many as every
window allows now, counting the moments granted and not yet used, paced when more jobs
wait than can go. A submit step uses its moment (``consume.lua``) just before it sends,
which logs the real send time. An upstream 429 may block the key for a while
(:meth:`SharedRateLimiter.block`, capped; an operator's resume clears it). Why, and how
the moments go to jobs: docs/design.md, "Sharing the key's send moments".
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from worker import keys
from worker.lua import load_script
from worker.store.clock import server_time

#: A send may reach the upstream this much later than the moment it was logged at (a
#: busy host); the windows are widened by as much.
SEND_TOLERANCE_S = 0.08
#: A granted moment not used within this long is void (its job's step was lost or late;
#: the job goes back to its place in line).
GRANT_VALID_S = 10.0
#: No hold after a 429 is longer than this.
MAX_BLOCK_S = 300.0
#: A burst (every waiting job at once) leaves this share of the limit free, so that a job
#: of a higher class arriving just after finds a moment instead of waiting a window.
BURST_KEEPS = 0.1


#: A granted moment's member is ``<key id><GRANT_KEY_END><unique>:<n>``.
GRANT_KEY_END = "|"


def key_of_grant(member: str) -> str:
    """The id of the key whose budget a granted moment is of."""
    return member.partition(GRANT_KEY_END)[0]


def return_grant(client: redis.Redis, member: str) -> None:
    """Give back a moment of any key (a worker without that key's settings met the job);
    its pace is left as it is."""
    client.zrem(keys.rate_pending(key_of_grant(member)), member)


@dataclass(frozen=True)
class Grants:
    """Send moments granted now (``members``), and when another may be granted."""

    members: list[str]
    next_in: float


@dataclass(frozen=True)
class Usage:
    used_in_window: int
    granted_unused: int
    blocked_for: float


class SharedRateLimiter:
    """A fleet-wide budget of ``limit`` requests per ``window`` seconds.

    Parameters:
        client: Redis shared by every worker (the broker's).
        api_key_id: a non-secret identifier of the API key.
        limit, window: the budget, e.g. 20 per 10 s.
    """

    def __init__(self, client: redis.Redis, api_key_id: str, limit: int, window: float) -> None:
        self.redis = client
        self.limit = limit
        self.window = window
        self._log_key = keys.rate_log(api_key_id)
        self._pending_key = keys.rate_pending(api_key_id)
        self._blocked_key = keys.rate_blocked(api_key_id)
        self._pace_key = keys.rate_pace(api_key_id)
        self._pause_key = keys.pause(api_key_id)
        self._spend_key = keys.spend_log(api_key_id)
        self.api_key_id = api_key_id
        self._grant = load_script(client, "grant")
        self._consume = load_script(client, "consume")
        self._give_back = load_script(client, "give_back")
        self._block = load_script(client, "block")
        self._usage = load_script(client, "usage")

    @property
    def effective_window(self) -> float:
        return self.window + SEND_TOLERANCE_S

    @property
    def period(self) -> float:
        """Seconds between two paced moments: the budget spread evenly."""
        return self.window / self.limit

    def grant(
        self, waiting: int, most: int, spend_caps: Sequence[tuple[int, float]] = ()
    ) -> Grants:
        """Grant up to ``most`` moments to the ``waiting`` jobs (see ``grant.lua``).

        ``spend_caps``: the key's spend cap windows; no moment is granted while one is full.
        """
        caps = [str(v) for limit, window in spend_caps for v in (limit, window)]
        reply = self._grant(
            keys=[
                self._log_key,
                self._pending_key,
                self._blocked_key,
                self._pace_key,
                self._pause_key,
                self._spend_key,
            ],
            args=[
                self.limit,
                self.effective_window,
                self.period,
                waiting,
                most,
                GRANT_VALID_S,
                f"{self.api_key_id}{GRANT_KEY_END}{uuid.uuid4().hex}",
                math.ceil(self.limit * BURST_KEEPS),
                len(spend_caps),
                *caps,
            ],
        )
        members = [m.decode() if isinstance(m, bytes) else str(m) for m in reply[1:]]
        return Grants(members, max(0.0, float(reply[0])))

    def consume(self, member: str) -> bool:
        """Use a granted moment now; False when it is void (expired, given back, blocked)."""
        keys_ = [self._log_key, self._pending_key, self._blocked_key]
        return int(self._consume(keys=keys_, args=[member, self.effective_window])) == 1

    def owns(self, member: str) -> bool:
        """Whether a granted moment is of this key's budget (not another key's, as in a
        key rotation, when workers of both keys share the lines)."""
        return key_of_grant(member) == self.api_key_id

    def give_back(self, members: Sequence[str]) -> None:
        """Return granted moments of this key that no job will use (their pace too)."""
        if members:
            self._give_back(keys=[self._pending_key, self._pace_key], args=[self.period, *members])

    def now(self) -> float:
        """Redis's clock, which every moment is measured against."""
        return server_time(self.redis)

    def block(self, seconds: float) -> None:
        """Hold every send for ``seconds`` (at most :data:`MAX_BLOCK_S`)."""
        self._block(
            keys=[self._blocked_key, self._pending_key], args=[min(MAX_BLOCK_S, max(0.0, seconds))]
        )

    def blocked_until(self) -> float:
        """The moment (Redis clock) until which every send holds; 0 when none."""
        raw = self.redis.get(self._blocked_key)
        return float(raw) if raw else 0.0

    def clear_block(self) -> bool:
        """End a hold after a 429 (an operator's resume); True when there was one."""
        return bool(self.redis.delete(self._blocked_key))

    def usage(self) -> Usage:
        """Requests sent in the current window, moments granted and unused, any block."""
        used, granted, blocked, now = self._usage(
            keys=[self._log_key, self._pending_key, self._blocked_key], args=[self.window]
        )
        return Usage(int(used), int(granted), max(0.0, float(blocked) - float(now)))
