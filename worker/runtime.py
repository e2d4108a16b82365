"""Per-process singletons: the Redis clients, the job store and the upstream client.

They are created lazily, after Celery has forked its pool processes, and
recreated if the process id changes, so no socket is shared across a fork.
Redis clients are thread-safe; the HTTP session is kept per thread (per
greenlet under ``-P gevent``), so the ``threads`` and ``gevent`` pools work too.
"""

from __future__ import annotations

import hashlib
import os
import threading
from functools import lru_cache

import redis

from worker.jobstore import JobStore, decode_text
from worker.kie import KieClient
from worker.pause import FleetPause
from worker.ratelimit import SharedRateLimiter
from worker.settings import get_settings, parse_rate_limit


@lru_cache(maxsize=4)
def _backend_redis(pid: int) -> redis.Redis:
    return redis.Redis.from_url(get_settings().backend_url)


@lru_cache(maxsize=4)
def _job_store(pid: int) -> JobStore:
    settings = get_settings()
    return JobStore(_backend_redis(pid), ttl_s=settings.remix_job_ttl_s)


_local = threading.local()


def _new_kie_client() -> KieClient:
    settings = get_settings()
    if settings.kie_api_key is None:
        raise RuntimeError("KIE_API_KEY is not set")
    return KieClient(
        settings.kie_base_url,
        settings.kie_api_key,
        connect_timeout=settings.kie_connect_timeout_s,
        read_timeout=settings.kie_read_timeout_s,
    )


def job_store() -> JobStore:
    return _job_store(os.getpid())


def kie_client() -> KieClient:
    """One client (one HTTP session) per thread, or per greenlet under ``-P gevent``."""
    client: KieClient | None = getattr(_local, "client", None)
    if client is None or getattr(_local, "pid", None) != os.getpid():
        client = _local.client = _new_kie_client()
        _local.pid = os.getpid()
    return client


#: The ids of the API keys workers use, with their budgets, so operators can
#: address them without holding the secret.
KNOWN_KEYS_KEY = "remixq:keys"


def register_api_key() -> None:
    """Make this worker's key known to ``remixq status``/``pause``/``resume``."""
    broker_redis().hset(KNOWN_KEYS_KEY, api_key_id(), get_settings().kie_rate_limit)


def known_api_keys() -> dict[str, str]:
    """Key id -> its ``KIE_RATE_LIMIT``, for every key a worker registered (and our own)."""
    keys = {
        decode_text(k): decode_text(v) for k, v in broker_redis().hgetall(KNOWN_KEYS_KEY).items()
    }
    if get_settings().kie_api_key is not None:
        keys.setdefault(api_key_id(), get_settings().kie_rate_limit)
    return keys


def limiter_for(key_id: str, rate_limit: str | None = None) -> SharedRateLimiter:
    limit, window = parse_rate_limit(rate_limit or get_settings().kie_rate_limit)
    return SharedRateLimiter(broker_redis(), key_id, limit, window)


def pause_for(key_id: str) -> FleetPause:
    return FleetPause(broker_redis(), key_id, get_settings().remix_pause_probe_s)


def api_key_id() -> str:
    """A short, non-secret name for the configured API key (shared state is per key)."""
    key = get_settings().kie_api_key
    raw = key.get_secret_value() if key else ""
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


@lru_cache(maxsize=4)
def _broker_redis(pid: int) -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url)


@lru_cache(maxsize=4)
def _rate_limiter(pid: int) -> SharedRateLimiter:
    return limiter_for(api_key_id())


@lru_cache(maxsize=4)
def _fleet_pause(pid: int) -> FleetPause:
    return pause_for(api_key_id())


def broker_redis() -> redis.Redis:
    return _broker_redis(os.getpid())


def rate_limiter() -> SharedRateLimiter:
    return _rate_limiter(os.getpid())


def fleet_pause() -> FleetPause:
    return _fleet_pause(os.getpid())
