"""Small helpers shared by the integration tests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
import redis

from sandbox.control import SandboxControl
from sandbox.launch import redis_ping

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.1) -> T:
    """Return the first truthy value of ``predicate()``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def create_requests(control: SandboxControl, prompt: str) -> int:
    """createTask requests the sandbox received for ``prompt`` (faulted ones included)."""
    return int(control.stats()["create_requests_by_prompt"].get(prompt, 0))


def accepted(control: SandboxControl, prompt: str) -> int:
    """Upstream tasks the sandbox created (and would charge) for ``prompt``."""
    return int(control.stats()["accepted_by_prompt"].get(prompt, 0))


@contextlib.contextmanager
def empty_database(url: str, who: str, *, empty_after: bool = True) -> Iterator[redis.Redis]:
    """A client of the Redis database at ``url``, emptied first (and after, by default).

    Fails the test with a clear reason when no Redis answers there.
    """
    if not redis_ping(url):
        pytest.fail(f"{who} need Redis at {url} (see README)")
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield client
    finally:
        if empty_after:
            client.flushdb()
        client.close()
