"""Small helpers shared by the integration tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from sandbox.control import SandboxControl

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
