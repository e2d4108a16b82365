"""The fleet's clock follows the Redis server, whatever the host's wall clock does."""

from __future__ import annotations

import time

import pytest
import redis

from worker.store import clock as clock_module
from worker.store.clock import RedisClock, server_time


def test_a_step_of_the_host_clock_does_not_move_the_fleet_clock(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = RedisClock(redis_client)
    assert abs(clock.now() - server_time(redis_client)) < 0.5
    stepped = time.time() + 3600
    monkeypatch.setattr(clock_module.time, "time", lambda: stepped)

    assert abs(clock.now() - server_time(redis_client)) < 0.5


def test_the_last_known_reading_never_asks_redis(redis_client: redis.Redis) -> None:
    """What a thread that must not block on a Redis that is away reads."""
    away = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    assert RedisClock(away).last_known() is None  # never measured, and no attempt made

    clock = RedisClock(redis_client)
    clock.now()
    clock._client = away  # Redis is gone from now on
    reading = clock.last_known()

    assert reading is not None and abs(reading - server_time(redis_client)) < 0.5
