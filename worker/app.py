"""The Celery application: ``celery -A worker.app worker``.

No message of the pipeline waits inside the broker. Every wait (the next poll, a budget
moment, a backoff, a pause) is a member of the schedule in Redis, and the dispatcher
thread of every worker (:mod:`worker.fleet.dispatcher`) publishes a job's next step when it is
due. So no task has a countdown, every delivered message runs at once, and:

* the broker's visibility timeout only has to outlast one task (a step makes at most one
  upstream request with a total deadline, a poll batch stops starting polls after that
  deadline), and a message a dead worker held is redelivered after it; long before that
  the schedule's lease has sent the job again (``Settings.lease_s``), and the stale
  message is dropped by its dispatch token;
* a worker that loses its broker connection holds no countdown messages that would be
  stranded until the visibility timeout.

``worker_prefetch_multiplier = 1``: each process reserves only the message it is about to
run. Each queue has an exchange of its own, so a message published to one exchange lands
in one queue only. A worker started without ``-Q`` consumes all four queues: ``submit``,
``poll``, ``notify`` (completion webhooks, :mod:`worker.store.notify`) and ``archive``
(copies of result images, :mod:`worker.store.archive`).

Importing this module does not take over a host application's Celery: the app is not
made current, and the kombu guard (:mod:`worker.fleet.broker_guard`) is installed in worker
processes only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any

import redis
from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    task_postrun,
    task_prerun,
    worker_init,
    worker_ready,
)
from kombu import Exchange, Queue

from worker.fleet import broker_guard
from worker.fleet.registry import register_api_key
from worker.logs import enter_task, install_log_format, leave_task
from worker.redaction import Redactor, install_log_redaction
from worker.services import Services, build_services
from worker.settings import Settings, get_settings, set_overrides
from worker.store import connection
from worker.store.publisher import (
    ARCHIVE_QUEUE,
    ARCHIVE_TASK,
    NOTIFY_QUEUE,
    NOTIFY_TASK,
    POLL_QUEUE,
    POLL_TASK,
    SUBMIT_QUEUE,
    SUBMIT_TASK,
)
from worker.upstreams.providers import configured_providers

#: Seconds between the broker's sweeps for messages whose visibility ran out.
RESTORE_INTERVAL_S = 5
BROKER_SOCKET_TIMEOUT_S = 10
BROKER_CONNECT_TIMEOUT_S = 2
BROKER_HEALTH_CHECK_S = 10
logger = logging.getLogger("worker.app")
QUEUES = (
    Queue(SUBMIT_QUEUE, Exchange(SUBMIT_QUEUE, type="direct"), routing_key=SUBMIT_QUEUE),
    Queue(POLL_QUEUE, Exchange(POLL_QUEUE, type="direct"), routing_key=POLL_QUEUE),
    Queue(NOTIFY_QUEUE, Exchange(NOTIFY_QUEUE, type="direct"), routing_key=NOTIFY_QUEUE),
    Queue(ARCHIVE_QUEUE, Exchange(ARCHIVE_QUEUE, type="direct"), routing_key=ARCHIVE_QUEUE),
)
#: How kombu's Redis transport stores bindings (``_kombu.binding.<exchange>``).
_BINDING_KEYS = ("_kombu.binding.{}", "_kombu.binding_permanent.{}")
_BINDING_SEP = b"\x06\x16"


def celery_config() -> dict[str, Any]:
    """The Celery configuration, built from the settings when Celery first needs it."""
    settings = get_settings()
    return dict(
        **celery_redis_config(settings),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # The pool size of a worker started without -c (which wins when given).
        worker_concurrency=settings.worker_concurrency,
        redis_socket_timeout=BROKER_SOCKET_TIMEOUT_S,
        redis_socket_connect_timeout=BROKER_CONNECT_TIMEOUT_S,
        redis_retry_on_timeout=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_queues=QUEUES,
        task_default_queue=SUBMIT_QUEUE,
        task_default_exchange=SUBMIT_QUEUE,
        task_default_routing_key=SUBMIT_QUEUE,
        task_routes={
            SUBMIT_TASK: {"queue": SUBMIT_QUEUE},
            POLL_TASK: {"queue": POLL_QUEUE},
            NOTIFY_TASK: {"queue": NOTIFY_QUEUE},
            ARCHIVE_TASK: {"queue": ARCHIVE_QUEUE},
        },
        result_expires=settings.remix_job_ttl_s,
        # Task events, so that Flower sees every job (REMIX_TASK_EVENTS, on by default): a
        # worker sends three per task (received, started, succeeded or failed). Flower
        # would switch them on by itself, but only every 5 s: the tasks of a worker just
        # (re)started would be missing. Whoever publishes a message (enqueue_remix, the
        # HTTP app, a worker's dispatcher) also sends its "task-sent" event, so that a
        # queued job shows in Flower (PENDING) before a worker takes it. Both go out in
        # batches (worker.fleet.steps.EventBatchStep, worker.store.publisher.SentEvents).
        # Their cost: docs/benchmarks.md, section 4.
        worker_send_task_events=settings.remix_task_events,
        task_send_sent_event=settings.remix_task_events,
        worker_hijack_root_logger=True,
    )


def celery_redis_config(settings: Settings) -> dict[str, Any]:
    """Where the broker and the result backend are, as Celery takes it: their URLs, and
    with a ``sentinel://`` URL the primary's name and the sentinels' options."""
    return dict(
        broker_url=connection.celery_url(settings.redis_url),
        broker_transport_options={
            # A message unacknowledged this long (its worker died) is delivered again;
            # no task may run longer (Settings.archive_step_s).
            "visibility_timeout": settings.remix_broker_visibility_timeout_s,
            "unacked_restore_interval": RESTORE_INTERVAL_S,
            "unacked_restore_throttle": 1,
            "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
            "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_S,
            "health_check_interval": BROKER_HEALTH_CHECK_S,
            "retry_on_timeout": True,
            **connection.celery_transport_options(settings.redis_url, settings.sentinel),
        },
        result_backend=connection.celery_url(settings.backend_url),
        result_backend_transport_options=connection.celery_transport_options(
            settings.backend_url, settings.sentinel
        ),
    )


class RemixqCelery(Celery):  # type: ignore[misc]
    """The Celery app; its bootsteps reach this process's services through it."""

    def services(self) -> Services:
        return services()


app = RemixqCelery("remixq", include=["worker.tasks"], set_as_current=False)
# Lazy, so that importing the package never fails on a bad setting: the error
# surfaces (as one line) where the configuration is first used.
app.add_defaults(celery_config)
# Named by string, as Celery's own steps are: the fleet's steps need no import of this module.
app.steps["worker"].add("worker.fleet.steps:DispatcherStep")
app.steps["consumer"].add("worker.fleet.steps:BrokerConnectionStep")
app.steps["consumer"].add("worker.fleet.steps:EventBatchStep")


@worker_init.connect
def _start_worker(**_: Any) -> None:
    """Refuse to start without an upstream key; set up what only a worker needs.

    One upstream is enough: kie.ai (``KIE_API_KEY``) or the legacy remix relay
    (``IDEOGRAM_BASE_URL`` and ``IDEOGRAM_API_KEY``). Jobs for the other then fail with
    ``provider_not_configured``.
    """
    settings = get_settings()
    if not configured_providers(settings):
        raise SystemExit(
            "remixq worker: neither KIE_API_KEY nor IDEOGRAM_BASE_URL with IDEOGRAM_API_KEY "
            "is set; refusing to start"
        )

    broker_guard.install()
    connection.use_in_kombu()
    set_worker_role()
    register_api_key(services())
    drop_stale_bindings(connection.connect(settings.redis_url))


@worker_ready.connect
def _warn_about_eviction(**_: Any) -> None:
    """Job records have a TTL: a ``volatile-*`` (or ``allkeys-*``) policy evicts them."""
    settings = get_settings()
    for url in dict.fromkeys((settings.redis_url, settings.backend_url)):
        policy = eviction_policy(connection.connect(url, socket_timeout=5))
        if policy not in (None, "noeviction"):
            logger.warning(
                "Redis maxmemory-policy is %s: under memory pressure it may evict job "
                "records and queued messages; set maxmemory-policy noeviction",
                policy,
            )


def eviction_policy(client: redis.Redis) -> str | None:
    """The server's ``maxmemory-policy`` (None when it may not be read, as on some hosts)."""
    try:
        value = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.RedisError:
        return None
    return None if value is None else str(value.decode() if isinstance(value, bytes) else value)


def drop_stale_bindings(client: redis.Redis) -> int:
    """Remove bindings that route a queue's exchange to another queue.

    Every queue has an exchange of its own; a binding of that exchange to another queue
    (left in Redis by a deployment that routed differently) would deliver each message
    to both queues. Returns how many were removed.
    """
    removed = 0
    for queue in QUEUES:
        for pattern in _BINDING_KEYS:
            key = pattern.format(queue.exchange.name)
            for member in client.smembers(key):
                raw = member if isinstance(member, bytes) else member.encode()
                if raw.split(_BINDING_SEP)[-1].decode() != queue.name:
                    removed += int(client.srem(key, member))
    return removed


def _redact_logs(logger: logging.Logger | None = None, **_: Any) -> None:
    """Every handler Celery sets up gets the job fields and the chosen format
    (:mod:`worker.logs`), then a filter that removes secrets (tracebacks' and fields' too)."""
    settings = get_settings()
    targets = [logger] if logger is not None else []
    install_log_format(settings.remix_log_json, targets)  # first: redaction sees its fields
    install_log_redaction(Redactor(settings.secrets()), targets)


after_setup_logger.connect(_redact_logs, weak=False)
after_setup_task_logger.connect(_redact_logs, weak=False)
task_prerun.connect(enter_task, weak=False)  # celery's lines about a task name its jobs
task_postrun.connect(leave_task, weak=False)


# ----------------------------------------------------------------- this process's services

_lock = threading.Lock()
_cache: dict[int, Services] = {}


def services() -> Services:
    """This process's services (built on first use, and again in a forked child)."""
    pid = os.getpid()
    found = _cache.get(pid)
    if found is None:
        with _lock:
            found = _cache.get(pid)
            if found is None:
                _cache.clear()
                found = _cache[pid] = build_services(get_settings(), app)
    return found


def _reset() -> None:
    with _lock:
        _cache.clear()


def configure(**overrides: Any) -> Settings:
    """Point this process at other settings (tests, the demo, the benchmark).

    ``overrides`` are settings fields (``redis_url=...``) that win over the environment.
    The Celery app follows the new Redis URLs; every cached client is dropped.
    """
    set_overrides(**overrides)
    _reset()
    settings = get_settings()
    for name, value in celery_redis_config(settings).items():
        app.conf[name] = value
    _forget_celery_connections(app)
    return settings


def _forget_celery_connections(app: Any) -> None:
    """Drop the broker pool and result backend Celery built for the previous URLs.

    Celery has no public way to do this; these are Celery 5's own attributes.
    kombu keeps its pools in process-wide registries keyed by the connection's URL, so
    the closed pool leaves them too: else the next publish to the same URL would get it
    back ("Acquire on closed pool").
    """
    with contextlib.suppress(AttributeError):
        del app._local.backend
    closed = getattr(app, "_pool", None)
    if closed is not None:
        closed.force_close_all()
        app._pool = None
        _unregister_pool(closed)
    if getattr(app.amqp, "_producer_pool", None) is not None:
        app.amqp._producer_pool = None


def _unregister_pool(closed: Any) -> None:
    """Remove a closed connection pool, and the producer pools on it, from kombu's registries."""
    from kombu import pools

    # The registries' keys are already hashed (kombu's EqualityDict), so they are removed
    # with the plain dict method rather than ``del``, which would hash them again.
    for key, pool in list(pools.connections.items()):
        if pool is closed:
            dict.pop(pools.connections, key, None)
    for key, pool in list(pools.producers.items()):
        if getattr(pool, "connections", None) is closed:
            dict.pop(pools.producers, key, None)


def set_worker_role() -> None:
    """This process is a worker: Redis commands ride out longer outages."""
    connection.set_worker_role()
    _reset()
