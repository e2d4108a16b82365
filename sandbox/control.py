"""A client for the sandbox's control endpoints, for tests, demos and benchmarks."""

from __future__ import annotations

import time
from typing import Any

import requests

DEFAULT_TIMEOUT_S = 5.0
READY_POLL_S = 0.05
BAD_REQUEST = 400


class SandboxControl:
    """Read and change a running sandbox over HTTP."""

    def __init__(self, base_url: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """:param base_url: the sandbox URL, e.g. ``http://127.0.0.1:8090``.
        :param timeout: seconds allowed per request.
        """
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._session = requests.Session()
        self._session.trust_env = False

    def configure(self, **patch: Any) -> dict[str, Any]:
        """Merge settings into the sandbox's config and return the whole config.

        :param patch: field name to new value, e.g. ``faults={429: 0.2}``.
        :raises ValueError: with the sandbox's reason when the patch is invalid.
        """
        response = self._session.post(
            self._url("/_sandbox/config"), json=patch, timeout=self.timeout
        )
        if response.status_code == BAD_REQUEST:
            raise ValueError(response.json().get("msg", response.text))
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def config(self) -> dict[str, Any]:
        """The sandbox's current config."""
        return self._get_json("/_sandbox/config")

    def stats(self) -> dict[str, Any]:
        """The sandbox's counters (see ``GET /_sandbox/stats``)."""
        return self._get_json("/_sandbox/stats")

    def reset(self) -> None:
        """Clear the sandbox's tasks and counters; the config stays."""
        response = self._session.post(self._url("/_sandbox/reset"), timeout=self.timeout)
        response.raise_for_status()

    def is_ready(self) -> bool:
        """Whether ``/healthz`` answers 200 right now."""
        try:
            response = self._session.get(self._url("/healthz"), timeout=self.timeout)
        except requests.RequestException:
            return False
        return response.status_code == requests.codes.ok

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until ``/healthz`` answers.

        :param timeout: seconds to wait at most.
        :raises TimeoutError: when it does not answer in time.
        """
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"sandbox at {self.base_url} not ready after {timeout:g} s")
            time.sleep(READY_POLL_S)

    def close(self) -> None:
        """Close the pooled connections."""
        self._session.close()

    def _url(self, path: str) -> str:
        return self.base_url + path

    def _get_json(self, path: str) -> dict[str, Any]:
        response = self._session.get(self._url(path), timeout=self.timeout)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result
