"""Redis clients with timeouts and a retry budget that depends on the process's role.

A worker rides out a Redis blip of :data:`WORKER_REDIS_RETRY_S` inside a task; a producer
gives up after :data:`PRODUCER_REDIS_RETRY_S` with a clear error instead of hanging.
See docs/architecture.md.
"""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

#: How long a worker's Redis commands keep retrying through an outage.
WORKER_REDIS_RETRY_S = 15.0
#: How long a producer's Redis commands keep retrying before the caller hears of it.
PRODUCER_REDIS_RETRY_S = 2.0
REDIS_SOCKET_TIMEOUT_S = 10.0
REDIS_CONNECT_TIMEOUT_S = 2.0
REDIS_HEALTH_CHECK_S = 30
_BACKOFF_CAP_S = 1.0
_BACKOFF_BASE_S = 0.05

_role = {"worker": False}


def set_worker_role() -> None:
    """This process is a worker: Redis clients built from now on ride out longer outages."""
    _role["worker"] = True


def _retries_for(budget_s: float) -> int:
    """How many retries of the backoff add up to about ``budget_s`` seconds of waiting."""
    total, count = 0.0, 0
    while total < budget_s:
        total += min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2**count)
        count += 1
    return count


def redis_client(url: str, retry_s: float | None = None) -> redis.Redis:
    """A client with timeouts, retrying a failed command for about ``retry_s`` seconds.

    By default as long as this process's role calls for (worker or producer).
    """
    budget = retry_s
    if budget is None:
        budget = WORKER_REDIS_RETRY_S if _role["worker"] else PRODUCER_REDIS_RETRY_S
    return redis.Redis.from_url(
        url,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        health_check_interval=REDIS_HEALTH_CHECK_S,
        retry=Retry(
            ExponentialBackoff(cap=_BACKOFF_CAP_S, base=_BACKOFF_BASE_S), _retries_for(budget)
        ),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )
