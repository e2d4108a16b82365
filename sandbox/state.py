"""The sandbox's memory: tasks and how their state follows the clock, counters, rate windows."""

from __future__ import annotations

import json
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

MS_PER_S = 1000
#: (state, fraction of the generation time at which it starts), in order.
PROGRESS: tuple[tuple[str, float], ...] = (
    ("waiting", 0.0),
    ("queuing", 0.1),
    ("generating", 0.3),
)
SUCCESS = "success"
FAIL = "fail"
FAIL_CODE = "501"
FAIL_MSG = "generation failed (sandbox)"


def _ms(seconds: float) -> int:
    return int(seconds * MS_PER_S)


@dataclass(frozen=True)
class Task:
    """One accepted createTask request.

    :param task_id: the id handed to the client.
    :param model: the model named in the request.
    :param param: the request body as a JSON string, as recordInfo reports it.
    :param prompt: the prompt, drawn on the result images.
    :param num_images: how many result images a success yields.
    :param image_size: the requested ``image_size``.
    :param callback_url: where the final record is POSTed, if anywhere.
    :param created_at: unix time of acceptance.
    :param duration: seconds from acceptance to the final state.
    :param fails: whether the final state is ``fail`` instead of ``success``.
    """

    task_id: str
    model: str
    param: str
    prompt: str
    num_images: int
    image_size: str
    callback_url: str | None
    created_at: float
    duration: float
    fails: bool

    @property
    def finished_at(self) -> float:
        """Unix time at which the task reaches its final state."""
        return self.created_at + self.duration

    def is_final(self, now: float) -> bool:
        """Whether the task has reached success or fail at ``now`` (unix time)."""
        return now >= self.finished_at

    def state_at(self, now: float) -> tuple[str, float]:
        """The state at ``now`` and the unix time it was entered.

        :param now: unix time.
        """
        if self.is_final(now):
            return (FAIL if self.fails else SUCCESS), self.finished_at
        fraction = (now - self.created_at) / self.duration
        state, start = next((s, f) for s, f in reversed(PROGRESS) if fraction >= f)
        return state, self.created_at + start * self.duration

    def result_urls(self, base_url: str) -> list[str]:
        """The URLs of the result images served by the sandbox at ``base_url``."""
        return [f"{base_url}/files/{self.task_id}/{index}.png" for index in range(self.num_images)]

    def record(self, now: float, base_url: str) -> dict[str, Any]:
        """The ``data`` object recordInfo answers for this task at ``now``.

        :param now: unix time.
        :param base_url: the sandbox URL the result images are served from.
        """
        state, entered = self.state_at(now)
        final = state in (SUCCESS, FAIL)
        results = {"resultUrls": self.result_urls(base_url)} if state == SUCCESS else None
        return {
            "taskId": self.task_id,
            "model": self.model,
            "state": state,
            "param": self.param,
            "resultJson": json.dumps(results) if results else "",
            "failCode": FAIL_CODE if state == FAIL else "",
            "failMsg": FAIL_MSG if state == FAIL else "",
            "costTime": _ms(self.duration) if final else None,
            "completeTime": _ms(self.finished_at) if final else None,
            "createTime": _ms(self.created_at),
            "updateTime": _ms(entered),
        }


@dataclass
class Stats:
    """Counters served at ``/_sandbox/stats``; see :meth:`as_json` for the keys.

    ``ambiguous`` counts createTask requests that created a task whose answer the client
    did not get whole (dropped, or a cut body); ``ambiguous_by_prompt`` splits them by prompt.
    """

    create_requests: int = 0
    create_accepted: int = 0
    create_by_code: Counter[int] = field(default_factory=Counter)
    record_requests: int = 0
    record_by_code: Counter[int] = field(default_factory=Counter)
    rate_limited: int = 0
    resets: int = 0
    html_errors: int = 0
    slow_answers: int = 0
    cut_bodies: int = 0
    dropped: int = 0
    gateway_timeouts: int = 0
    trickled: int = 0
    ambiguous: int = 0
    callbacks_sent: int = 0
    callbacks_failed: int = 0
    callbacks_refused: int = 0
    auth_headers_seen_invalid: int = 0
    upload_requests: int = 0
    upload_by_code: Counter[int] = field(default_factory=Counter)
    #: The sha256 of every file stored by the upload endpoint, in order.
    uploaded_sha256: list[str] = field(default_factory=list)
    accepted_at: list[float] = field(default_factory=list)
    create_requests_by_prompt: Counter[str] = field(default_factory=Counter)
    accepted_by_prompt: Counter[str] = field(default_factory=Counter)
    ambiguous_by_prompt: Counter[str] = field(default_factory=Counter)
    #: The legacy remix relay: requests, accepted ones (sync or async), answers by code.
    relay_requests: int = 0
    relay_accepted: int = 0
    relay_by_code: Counter[int] = field(default_factory=Counter)
    relay_requests_by_prompt: Counter[str] = field(default_factory=Counter)
    relay_accepted_by_prompt: Counter[str] = field(default_factory=Counter)
    relay_status_requests: int = 0
    #: The ``image_request`` and the image's type and size of the last accepted request.
    relay_last_request: dict[str, Any] = field(default_factory=dict)

    def as_json(self, tasks: int) -> dict[str, Any]:
        """The counters as a JSON-ready dict, with ``tasks`` (the number of tasks held)."""
        data = {name: _jsonable(value) for name, value in vars(self).items()}
        data["tasks"] = tasks
        return data


def _jsonable(value: Any) -> Any:
    """A copy of a counter value that JSON can hold (object keys become strings)."""
    if isinstance(value, Counter):
        return {str(key): count for key, count in value.items()}
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


class SlidingWindow:
    """Timestamps of accepted requests per key, for an "N per S seconds" limit."""

    def __init__(self) -> None:
        self._events: dict[str, deque[float]] = {}

    def wait_time(self, key: str, limit: int, window: float, now: float) -> float:
        """Seconds until ``key`` may make another request; 0 when it may now.

        :param key: the API key.
        :param limit: requests allowed per window.
        :param window: the window length in seconds.
        :param now: unix time.
        """
        events = self._events.setdefault(key, deque())
        while events and events[0] <= now - window:
            events.popleft()
        if len(events) < limit:
            return 0.0
        return events[len(events) - limit] + window - now

    def record(self, key: str, now: float) -> None:
        """Count one accepted request of ``key`` at ``now`` (unix time)."""
        self._events.setdefault(key, deque()).append(now)

    def clear(self) -> None:
        """Forget every request."""
        self._events.clear()
