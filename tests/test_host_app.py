"""remixq as a library inside a host service that has a Celery app of its own.

Importing ``producers`` must not take over the host's Celery: the host's ``shared_task``
still goes to the host's broker, and the kombu guard (a worker-only patch) is not
installed by an import.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sandbox.launch import REPO_ROOT
from tests import redis_kit

pytestmark = pytest.mark.integration
HOST_REDIS_URL = redis_kit.sibling(redis_kit.url(redis_kit.MAIN), 11)

HOST = f"""
import json
from celery import Celery, shared_task

host = Celery("host", broker={HOST_REDIS_URL!r}, backend={HOST_REDIS_URL!r})
host.set_current()

@shared_task(name="host.add")
def add(a, b):
    return a + b

import producers  # the library, imported after the host's app exists
from kombu.transport import redis as kombu_redis
from worker.app import app as remixq_app

result = add.apply_async((1, 2), queue="host-queue")
print(json.dumps({{
    "broker": add.app.conf.broker_url,
    "current_is_host": __import__("celery").current_app.main == "host",
    "remixq_is_current": __import__("celery").current_app is remixq_app,
    "guard_installed": hasattr(kombu_redis.Channel._brpop_read, "_remixq_guarded"),
    "task_id": result.id,
}}))
"""


def test_importing_producers_leaves_the_host_celery_alone() -> None:
    import redis

    host_redis = redis.Redis.from_url(HOST_REDIS_URL)
    host_redis.delete("host-queue")
    result = subprocess.run(
        [sys.executable, "-c", HOST],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])

    assert seen["broker"] == HOST_REDIS_URL
    assert seen["current_is_host"] and not seen["remixq_is_current"]
    assert not seen["guard_installed"]
    queued = [json.loads(m) for m in host_redis.lrange("host-queue", 0, -1)]
    assert [m["headers"]["id"] for m in queued] == [seen["task_id"]]
    host_redis.delete("host-queue")
