"""Fleet-wide pause of submissions for conditions that concern the whole key.

455 (maintenance) and 402 (insufficient credits) are not about one job: every
createTask would get the same answer. The first worker to see one *trips* the
pause; from then on every submit holds (the job stays queued, its retry budget
untouched) and one of them, at a growing interval, probes the key's
remaining-credits endpoint. When the probe succeeds (for 402: credits above
zero) the pause clears and everyone resumes. An operator may also pause
(``remixq pause``), which no probe clears, and resume (``remixq resume``).

State lives in one Redis hash per API key; the transitions are Lua scripts so
that exactly one worker logs the trip and exactly one probes at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from worker.jobstore import KEY_PREFIX, decode_text

OPERATOR = "operator"
#: Each failed probe doubles the delay before the next one, up to this.
MAX_PROBE_INTERVAL_S = 300.0
METRICS_KEY = KEY_PREFIX + "metrics"

# KEYS: pause hash. ARGV: reason, message, first probe delay -> 1 when newly tripped.
# An operator's pause is never replaced by an automatic one.
_TRIP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'reason', ARGV[1], 'message', ARGV[2], 'since', tostring(now),
  'interval', ARGV[3], 'probe_at', tostring(now + tonumber(ARGV[3])))
return 1
"""

# KEYS: pause hash. ARGV: max interval -> 1 when the caller should probe now.
_CLAIM_PROBE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local reason = redis.call('HGET', KEYS[1], 'reason')
if not reason or reason == 'operator' then return 0 end
local probe_at = tonumber(redis.call('HGET', KEYS[1], 'probe_at'))
if now < probe_at then return 0 end
local interval = math.min(tonumber(redis.call('HGET', KEYS[1], 'interval')) * 2, tonumber(ARGV[1]))
redis.call('HSET', KEYS[1], 'interval', tostring(interval), 'probe_at', tostring(now + interval))
return 1
"""


@dataclass(frozen=True)
class PauseState:
    reason: str
    message: str
    since: float
    probe_at: float

    @property
    def by_operator(self) -> bool:
        return self.reason == OPERATOR


class FleetPause:
    """The pause switch for one API key.

    Parameters:
        client: Redis shared by every worker.
        api_key_id: a non-secret identifier of the API key.
        first_probe_s: delay before the first probe after a trip.
    """

    def __init__(self, client: redis.Redis, api_key_id: str, first_probe_s: float = 5.0) -> None:
        self.redis = client
        self.first_probe_s = first_probe_s
        self.key = f"{KEY_PREFIX}pause:{api_key_id}"
        self._trip = client.register_script(_TRIP)
        self._claim_probe = client.register_script(_CLAIM_PROBE)

    def state(self) -> PauseState | None:
        raw = self.redis.hgetall(self.key)
        if not raw:
            return None
        fields = {decode_text(k): decode_text(v) for k, v in raw.items()}
        return PauseState(
            reason=fields.get("reason", ""),
            message=fields.get("message", ""),
            since=float(fields.get("since", 0)),
            probe_at=float(fields.get("probe_at", 0)),
        )

    def trip(self, reason: str, message: str) -> bool:
        """Pause for ``reason`` ("455", "402"); True only for the call that paused."""
        args: list[str | float] = [reason, message, self.first_probe_s]
        tripped = int(self._trip(keys=[self.key], args=args)) == 1
        if tripped:
            self.redis.hincrby(METRICS_KEY, f"pauses_total:{reason}", 1)
        return tripped

    def claim_probe(self) -> bool:
        """True for exactly one caller once the next probe is due."""
        return int(self._claim_probe(keys=[self.key], args=[MAX_PROBE_INTERVAL_S])) == 1

    def pause_by_operator(self, message: str = "paused by an operator") -> None:
        """Pause until :meth:`resume`; replaces an automatic pause."""
        self.redis.delete(self.key)
        self.redis.hset(
            self.key,
            mapping={"reason": OPERATOR, "message": message, "since": self._now(), "probe_at": 0},
        )
        self.redis.hincrby(METRICS_KEY, f"pauses_total:{OPERATOR}", 1)

    def resume(self) -> bool:
        """Clear any pause; True when there was one."""
        return bool(self.redis.delete(self.key))

    def seconds_to_probe(self) -> float:
        state = self.state()
        return 0.0 if state is None else max(0.0, state.probe_at - self._now())

    def _now(self) -> float:
        seconds, micros = self.redis.time()
        return seconds + micros / 1e6
