"""Fleet-wide pause of submissions for conditions that concern the whole key (402, 455).

:class:`FleetPause` is the switch: tripped at once by a 402, by a 455 only when 455s make a
run of the key's recent createTask answers (:class:`RecentAnswers`, which also tells a run
of 429s from a stray one); probed by one worker at a time at a growing interval; ended by
the probe that succeeds or by an operator. State lives in the broker's Redis per API key;
the transitions are Lua scripts. The design: docs/design.md, "The fleet's shared state".
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import redis

from worker import keys
from worker.lua import load_script
from worker.store.clock import server_time
from worker.store.jobs import decode_text
from worker.store.metrics import Metrics

OPERATOR = "operator"
#: Each failed probe doubles the delay before the next one, up to this.
MAX_PROBE_INTERVAL_S = 300.0
#: Recent createTask answers are those of the last this many seconds.
ANSWER_WINDOW_S = 10.0
#: A run of 455s or 429s: this many in a row (across every worker), or ...
RUN_IN_A_ROW = 5
#: ... this many within the window, ...
RUN_MIN_COUNT = 3
#: ... making up at least this share of the window's answers. Three in a row are no run
#: on a busy key: at 60 answers a second with one stray 455 in 16, three strays come in a
#: row every few minutes (and a success is counted once its acceptance is recorded, after
#: answers that came later), five about once a day.
RUN_MIN_SHARE = 0.5
ANSWER_KINDS = ("455", "429", "other")


@dataclass(frozen=True)
class PauseState:
    reason: str
    message: str
    since: str
    probe_at: float

    @property
    def by_operator(self) -> bool:
        return self.reason == OPERATOR

    @property
    def since_s(self) -> float:
        return float(self.since or 0)


@dataclass(frozen=True)
class RecentAnswers:
    """createTask answers of one key within :data:`ANSWER_WINDOW_S`."""

    maintenance: int
    rate_limited: int
    other: int
    maintenance_in_a_row: int
    rate_limited_in_a_row: int

    def _run_length(self, count: int, in_a_row: int) -> int:
        """How many answers make a run of a kind: every one of the window when they
        dominate it, else those in a row when there are enough; 0 when there is no run."""
        total = self.maintenance + self.rate_limited + self.other
        if count >= RUN_MIN_COUNT and count >= RUN_MIN_SHARE * total:
            return count
        return in_a_row if in_a_row >= RUN_IN_A_ROW else 0

    @property
    def maintenance_run(self) -> bool:
        """455s repeat: the upstream is under maintenance, not just hiccuping."""
        return self._run_length(self.maintenance, self.maintenance_in_a_row) > 0

    @property
    def rate_limited_run(self) -> bool:
        """429s repeat: the key's budget is exhausted."""
        return self.rate_limited_run_length > 0

    @property
    def rate_limited_run_length(self) -> int:
        """How many 429s make the run (0: none); not the strays of the window before it."""
        return self._run_length(self.rate_limited, self.rate_limited_in_a_row)


class FleetPause:
    """The pause switch and recent answers of one API key.

    Parameters:
        client: Redis shared by every worker.
        api_key_id: a non-secret identifier of the API key.
        first_probe_s: delay before the first probe after a trip.
    """

    def __init__(self, client: redis.Redis, api_key_id: str, first_probe_s: float = 5.0) -> None:
        self.redis = client
        self.api_key_id = api_key_id
        self.first_probe_s = first_probe_s
        self.key = keys.pause(api_key_id)
        self._answer_keys = [keys.recent_answers(api_key_id, kind) for kind in ANSWER_KINDS]
        self._streak_keys = [
            keys.recent_answers(api_key_id, f"{kind}-in-a-row") for kind in ("455", "429")
        ]
        self._trip = load_script(client, "pause_trip")
        self._claim_probe = load_script(client, "pause_probe")
        self._clear = load_script(client, "pause_clear")
        self._answers = load_script(client, "answers")

    def state(self) -> PauseState | None:
        return self.state_of(self.redis.hgetall(self.key))

    @staticmethod
    def state_of(raw: dict[Any, Any]) -> PauseState | None:
        """The pause a read of its hash (:attr:`key`) found; None: not paused."""
        if not raw:
            return None
        fields = {decode_text(k): decode_text(v) for k, v in raw.items()}
        return PauseState(
            reason=fields.get("reason", ""),
            message=fields.get("message", ""),
            since=fields.get("since", "0"),
            probe_at=float(fields.get("probe_at", 0)),
        )

    def trip(self, reason: str, message: str) -> bool:
        """Pause for ``reason`` ("455", "402"); True only for the call that paused."""
        args: list[str | float] = [reason, message, self.first_probe_s]
        tripped = int(self._trip(keys=[self.key], args=args)) == 1
        if tripped:
            self.redis.hincrby(keys.METRICS, f"pauses_total:{reason}", 1)
        return tripped

    def note_answer(self, kind: str) -> RecentAnswers:
        """Count a createTask answer (``455``, ``429`` or ``other``); the recent counts."""
        index = ANSWER_KINDS.index(kind)
        counts = self._answers(
            keys=[self._answer_keys[index], *self._answer_keys, *self._streak_keys],
            args=[ANSWER_WINDOW_S, uuid.uuid4().hex, kind],
        )
        return RecentAnswers(*(int(c) for c in counts))

    def note_success(self, writes: Metrics) -> None:
        """Count a createTask answer that is no 455 nor 429 when its recent counts are not
        needed: with ``writes``' batch of the step, best effort."""
        index = ANSWER_KINDS.index("other")
        writes.best_effort(
            self._answers,
            [self._answer_keys[index], *self._answer_keys, *self._streak_keys],
            [ANSWER_WINDOW_S, uuid.uuid4().hex, "other"],
        )

    def claim_probe(self) -> bool:
        """True for exactly one caller once the next probe is due."""
        return int(self._claim_probe(keys=[self.key], args=[MAX_PROBE_INTERVAL_S])) == 1

    def end(self, state: PauseState) -> bool:
        """End the pause ``state`` describes, and only that one (a probe succeeded)."""
        return int(self._clear(keys=[self.key], args=[state.reason, state.since])) == 1

    def pause_by_operator(self, message: str = "paused by an operator") -> None:
        """Pause until :meth:`resume`; replaces an automatic pause."""
        fields: list[str | float] = [
            "reason",
            OPERATOR,
            "message",
            message,
            "since",
            repr(self._now()),
            "probe_at",
            0,
        ]
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.key)
        pipe.hset(self.key, items=fields)
        pipe.hincrby(keys.METRICS, f"pauses_total:{OPERATOR}", 1)
        pipe.execute()

    def resume(self) -> bool:
        """End any pause and forget the recent answers; True when there was a pause."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.key)
        pipe.delete(*self._answer_keys, *self._streak_keys)
        ended, _ = pipe.execute()
        return bool(ended)

    def seconds_to_probe(self) -> float:
        state = self.state()
        return 0.0 if state is None else max(0.0, state.probe_at - self._now())

    def _now(self) -> float:
        return server_time(self.redis)
