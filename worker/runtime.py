"""Per-process singletons: the Redis client, the job store and the upstream client.

They are created lazily, after Celery has forked its pool processes, and
recreated if the process id changes, so no socket is shared across a fork.
"""

from __future__ import annotations

import os
from functools import lru_cache

import redis

from worker.jobstore import JobStore
from worker.kie import KieClient
from worker.settings import get_settings


@lru_cache(maxsize=4)
def _backend_redis(pid: int) -> redis.Redis:
    return redis.Redis.from_url(get_settings().backend_url)


@lru_cache(maxsize=4)
def _job_store(pid: int) -> JobStore:
    settings = get_settings()
    return JobStore(_backend_redis(pid), ttl_s=settings.remix_job_ttl_s)


@lru_cache(maxsize=4)
def _kie_client(pid: int) -> KieClient:
    settings = get_settings()
    if settings.kie_api_key is None:
        raise RuntimeError("KIE_API_KEY is not set")
    return KieClient(
        settings.kie_base_url,
        settings.kie_api_key,
        connect_timeout=settings.kie_connect_timeout_s,
        read_timeout=settings.kie_read_timeout_s,
    )


def backend_redis() -> redis.Redis:
    return _backend_redis(os.getpid())


def job_store() -> JobStore:
    return _job_store(os.getpid())


def kie_client() -> KieClient:
    return _kie_client(os.getpid())
