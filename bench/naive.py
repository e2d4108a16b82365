"""The baseline: the remix worker a user would write first (``celery -A bench.naive worker``).

One task, ``naive.remix``, calls createTask and then sleeps and asks recordInfo in a
loop until the upstream task ends, so a job holds a worker slot for its whole
generation time. A second task, ``naive.noop``, does nothing; it measures what Celery
itself costs per task on the same Redis.

The app uses Celery's defaults (early acknowledgement, prefetch multiplier 4) and its
own queue, so it can share a broker with the pipeline without taking its messages.
Both tasks return the moment they finished, which the benchmark reads back from the
result backend. Configuration comes from the same environment variables as the
pipeline: ``REDIS_URL``, ``RESULT_BACKEND_URL``, ``KIE_BASE_URL``, ``KIE_API_KEY``;
``NAIVE_TASK_EVENTS=1`` makes the worker send Celery's task events (as ``-E`` does).
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from typing import Any

import requests
from celery import Celery

NAIVE_QUEUE = "naive"
#: The environment variable that switches the worker's task events on.
TASK_EVENTS_VARIABLE = "NAIVE_TASK_EVENTS"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_BASE_URL = "http://127.0.0.1:8090"
MODEL = "ideogram/character-remix"
CREATE_TASK_PATH = "/api/v1/jobs/createTask"
RECORD_INFO_PATH = "/api/v1/jobs/recordInfo"
#: The fixed pause between two recordInfo requests of one job.
POLL_INTERVAL_S = 2.0
#: A job still unfinished upstream after this long raises ``TimeoutError``.
JOB_TIMEOUT_S = 900.0
REQUEST_TIMEOUT_S = (5.0, 20.0)
SUCCESS_CODE = 200
FINAL_STATES = frozenset({"success", "fail"})


def _broker_url() -> str:
    return os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)


app = Celery("remixq-naive")
app.conf.update(
    broker_url=_broker_url(),
    result_backend=os.environ.get("RESULT_BACKEND_URL") or _broker_url(),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue=NAIVE_QUEUE,
    broker_connection_retry_on_startup=True,
    worker_send_task_events=os.environ.get(TASK_EVENTS_VARIABLE) == "1",
)


@lru_cache(maxsize=4)
def _session(pid: int) -> requests.Session:
    """One HTTP session per process (created after the pool forks)."""
    session = requests.Session()
    session.trust_env = False
    session.headers["Authorization"] = f"Bearer {os.environ.get('KIE_API_KEY', '')}"
    return session


def _call(method: str, path: str, **kwargs: Any) -> Any:
    """One upstream request; returns ``data`` or raises on any code but 200."""
    base_url = os.environ.get("KIE_BASE_URL", DEFAULT_BASE_URL).rstrip("/")
    response = _session(os.getpid()).request(
        method, base_url + path, timeout=REQUEST_TIMEOUT_S, **kwargs
    )
    body = response.json()
    if response.status_code != SUCCESS_CODE or body.get("code") != SUCCESS_CODE:
        raise RuntimeError(f"{path} answered {body.get('code')}: {body.get('msg')}")
    return body.get("data")


@app.task(name="naive.remix")
def remix(request: dict[str, Any]) -> dict[str, Any]:
    """Create the upstream task, then poll every 2 s until it ends; returns its final state."""
    task_id = _call("POST", CREATE_TASK_PATH, json={"model": MODEL, "input": request})["taskId"]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    polls = 0
    while time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
        polls += 1
        info = _call("GET", RECORD_INFO_PATH, params={"taskId": task_id})
        if info["state"] in FINAL_STATES:
            return {"state": info["state"], "polls": polls, "finished_at": time.time()}
    raise TimeoutError(f"upstream task {task_id} unfinished after {JOB_TIMEOUT_S:g} s")


@app.task(name="naive.noop")
def noop() -> float:
    """Nothing at all; returns the moment it ran."""
    return time.time()
