"""Redis clients: the one place a client is built from a URL, with timeouts and a retry
budget that depends on the process's role.

A worker rides out a Redis blip of :data:`WORKER_REDIS_RETRY_S` inside a task; a producer
gives up after :data:`PRODUCER_REDIS_RETRY_S` with a clear error instead of hanging. A
``sentinel://`` URL gives a client of the group's current primary, which finds the new
one after a failover (:func:`connect`); the same URL, translated, configures Celery
(:func:`celery_transport_options`). See docs/architecture.md and docs/operations.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from worker.redis_urls import SentinelOptions, is_sentinel_url, parse_sentinel_url
from worker.settings import get_settings

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


def redis_client(
    url: str, retry_s: float | None = None, sentinel: SentinelOptions | None = None
) -> redis.Redis:
    """A client with timeouts, retrying a failed command for about ``retry_s`` seconds.

    By default as long as this process's role calls for (worker or producer). A command
    that fails on a dead primary is retried on the one the sentinels name next (see
    :func:`connect` for ``sentinel``).
    """
    budget = retry_s
    if budget is None:
        budget = WORKER_REDIS_RETRY_S if _role["worker"] else PRODUCER_REDIS_RETRY_S
    return connect(
        url,
        sentinel,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        health_check_interval=REDIS_HEALTH_CHECK_S,
        retry=Retry(
            ExponentialBackoff(cap=_BACKOFF_CAP_S, base=_BACKOFF_BASE_S), _retries_for(budget)
        ),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def connect(url: str, sentinel: SentinelOptions | None = None, **options: Any) -> redis.Redis:
    """A client of the server at ``url``: ``redis.Redis.from_url``, or for a ``sentinel://``
    URL a client of the group's primary (``Sentinel.master_for``), which asks the
    sentinels again whenever its connection to the primary breaks.

    ``options`` are redis-py connection options; ``sentinel`` the primary's name and the
    sentinels' password (by default this process's settings).
    """
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **options)
    group = _SentinelGroup.of(url, sentinel, options)
    manager = redis.sentinel.Sentinel(group.sentinels, sentinel_kwargs=group.sentinel_kwargs)
    client: redis.Redis = manager.master_for(
        group.master, connection_class=_PrimaryConnection, **group.primary
    )
    return client


def connect_async(
    url: str, sentinel: SentinelOptions | None = None, **options: Any
) -> redis.asyncio.Redis:
    """:func:`connect` for asyncio (the HTTP app)."""
    if not is_sentinel_url(url):
        return redis.asyncio.Redis.from_url(url, **options)
    group = _SentinelGroup.of(url, sentinel, options)
    manager = redis.asyncio.sentinel.Sentinel(
        group.sentinels, sentinel_kwargs=group.sentinel_kwargs
    )
    client: redis.asyncio.Redis = manager.master_for(
        group.master, connection_class=_AsyncPrimaryConnection, **group.primary
    )
    return client


def celery_url(url: str) -> str:
    """``url`` as Celery takes it (a Sentinel URL with its credentials on the first entry)."""
    return parse_sentinel_url(url).celery_url() if is_sentinel_url(url) else url


def celery_transport_options(url: str, sentinel: SentinelOptions) -> dict[str, Any]:
    """What Celery's Sentinel transport and result backend need beside the URL: the
    primary's name and how to reach the sentinels (nothing for a plain URL)."""
    if not is_sentinel_url(url):
        return {}
    timeouts = {
        "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S,
    }
    group = _SentinelGroup.of(url, sentinel, timeouts)
    return {"master_name": group.master, "sentinel_kwargs": group.sentinel_kwargs}


class _PrimaryConnection(redis.sentinel.SentinelManagedConnection):
    """A connection to the group's primary that asks the sentinels where it is on every
    (re)connection.

    redis-py's own reconnects the address it had when a command is retried
    (redis/redis-py#3874): after a failover, the dead primary's, and once that one is
    back, a replica, or an empty primary the sentinels have not converted yet, whose
    answers are wrong and whose writes are dropped.
    """

    def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self._sock is None:
            self.host, self.port = self.connection_pool.get_master_address()
        super().connect_check_health(check_health, retry_socket_connect)


class _AsyncPrimaryConnection(redis.asyncio.sentinel.SentinelManagedConnection):
    """:class:`_PrimaryConnection` for asyncio."""

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if not self.is_connected:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(check_health, retry_socket_connect)


def use_in_kombu() -> None:
    """Have the broker's connections (kombu's Sentinel transport) ask the sentinels on every
    reconnection too (see :class:`_PrimaryConnection`); for worker processes."""
    from kombu.transport import redis as kombu_redis

    kombu_redis.SentinelChannel.connection_class = _PrimaryConnection


@dataclass(frozen=True, repr=False)  # it holds the passwords
class _SentinelGroup:
    """A Sentinel URL and its settings as redis-py's ``Sentinel`` takes them."""

    sentinels: list[tuple[str, int]]
    sentinel_kwargs: dict[str, Any]
    master: str
    primary: dict[str, Any]

    @classmethod
    def of(
        cls, url: str, sentinel: SentinelOptions | None, options: dict[str, Any]
    ) -> _SentinelGroup:
        found = get_settings().sentinel if sentinel is None else sentinel
        parsed = parse_sentinel_url(url)
        # The sentinels get the timeouts (a dead one must not hang discovery), not the retry.
        sentinel_kwargs = {k: v for k, v in options.items() if k.startswith("socket_")}
        if found.password is not None:
            sentinel_kwargs["password"] = found.password
        primary = {**options, "db": parsed.db}
        if parsed.username is not None:
            primary["username"] = parsed.username
        if parsed.password is not None:
            primary["password"] = parsed.password
        return cls(list(parsed.sentinels), sentinel_kwargs, found.master, primary)
