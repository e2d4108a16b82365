"""The Celery application: ``celery -A worker.app worker``.

Broker timing on Redis — two facts pull against each other:

* A message the worker has taken but not acknowledged is delivered again once
  it is older than the broker's ``visibility_timeout``. With ``task_acks_late``
  that includes a task waiting for its ETA/countdown inside a live worker: a
  countdown longer than the visibility timeout makes the task run twice.
* A SIGKILLed worker never acknowledges what it held; those messages come back
  only after the same ``visibility_timeout`` (checked every
  ``unacked_restore_interval`` seconds by any live worker).

So the visibility timeout is short (90 s, swept every 5 s) so that a killed
worker's jobs run again within about two minutes, and every countdown the
pipeline schedules is capped at half of it (``MAX_COUNTDOWN_S``): polls wait at
most ``REMIX_POLL_MAX_S`` and a longer wait is a chain of short countdowns.
Task bodies are short (one HTTP request with bounded timeouts), so no running
task approaches the timeout either.

``worker_prefetch_multiplier = 1``: with late acknowledgement every prefetched
message is stranded until the visibility timeout if the worker dies, so each
process reserves only the message it is about to run. (Celery still fetches
countdown messages early; those are bounded by the countdown cap above.)
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_init
from kombu import Queue

from worker import broker_guard
from worker.settings import VISIBILITY_TIMEOUT_S, get_settings
from worker.watchdog import WatchdogStep

SUBMIT_QUEUE = "submit"
POLL_QUEUE = "poll"
#: Seconds between the broker's sweeps for messages whose visibility ran out.
RESTORE_INTERVAL_S = 5


def celery_config() -> dict[str, Any]:
    """The Celery configuration, built from the settings when Celery first needs it."""
    settings = get_settings()
    return dict(
        broker_url=settings.redis_url,
        result_backend=settings.backend_url,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": VISIBILITY_TIMEOUT_S,
            "unacked_restore_interval": RESTORE_INTERVAL_S,
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        task_queues=(Queue(SUBMIT_QUEUE), Queue(POLL_QUEUE)),
        task_default_queue=SUBMIT_QUEUE,
        task_routes={
            "remix.submit": {"queue": SUBMIT_QUEUE},
            "remix.poll": {"queue": POLL_QUEUE},
        },
        result_expires=settings.remix_job_ttl_s,
        # Task events cost several Redis messages per task; Flower switches them
        # on in the workers it watches (its --enable_events, on by default).
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=True,
    )


broker_guard.install()
app = Celery("remixq", include=["worker.tasks"])
# Lazy, so that importing the package never fails on a bad setting: the error
# surfaces (as one line) where the configuration is first used.
app.add_defaults(celery_config)
app.steps["worker"].add(WatchdogStep)


@worker_init.connect
def _require_api_key(**_: Any) -> None:
    """A worker without an upstream key could only fail jobs: refuse to start."""
    if get_settings().kie_api_key is None:
        raise SystemExit("remixq worker: KIE_API_KEY is not set; refusing to start")
    from worker.runtime import register_api_key

    register_api_key()
