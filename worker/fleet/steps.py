"""The Celery bootsteps that run the fleet's dispatcher in every worker process.

Registered by name in :mod:`worker.app` (``app.steps["worker"].add("module:Class")``), so
this module needs no import of the app: it reaches the process's services through the
worker's app. See docs/architecture.md.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

from celery import bootsteps

from worker.fleet.dispatcher import QUEUES, Dispatcher, DispatcherThread
from worker.store.publisher import EVENT_BATCH_MAX, EVENT_FLUSH_S


class DispatcherStep(bootsteps.StartStopStep):
    """Runs the dispatcher in every worker process while it consumes."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Pool"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.thread: DispatcherThread | None = None

    def start(self, parent: Any) -> None:
        slots, queues = _pool_size(parent), _consumed(parent)
        self.thread = DispatcherThread(lambda: Dispatcher(parent.app.services(), slots, queues))
        parent.remixq_dispatcher = self.thread
        self.thread.start()

    def stop(self, parent: Any) -> None:
        if self.thread is not None:
            self.thread.stop()

    shutdown = stop


class BrokerConnectionStep(bootsteps.StartStopStep):
    """Tells the worker's dispatcher when its consumer loses and regains the broker.

    A consumer step starts each time the consumer has connected (again) and stops each
    time it loses the connection. The dispatcher's own Redis commands ride out a short
    outage on their own, so this is how it learns of one.
    """

    requires: ClassVar[set[str]] = {"celery.worker.consumer.connection:Connection"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.connections = 0

    def start(self, parent: Any) -> None:
        self.connections += 1
        thread = _dispatcher_of(parent)
        if self.connections > 1 and thread is not None:
            thread.broker_returned()

    def stop(self, parent: Any) -> None:
        thread = _dispatcher_of(parent)
        if thread is not None:
            thread.broker_lost()


class EventBatchStep(bootsteps.StartStopStep):
    """Sends the worker's task events (received, started, done) in batches, at most
    :data:`EVENT_FLUSH_S` late.

    Celery buffers them but publishes the buffer on the next turn of the event loop,
    which under load is one PUBLISH for every event or two; gathered for a few
    milliseconds, one PUBLISH carries dozens (Flower reads the batch as it reads one).
    See docs/benchmarks.md, section 4.
    """

    requires: ClassVar[set[str]] = {"celery.worker.consumer.events:Events"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.flush_pending = False

    def start(self, parent: Any) -> None:
        dispatcher, hub = getattr(parent, "event_dispatcher", None), getattr(parent, "hub", None)
        if dispatcher is None or hub is None or dispatcher.on_send_buffered is None:
            return
        self.flush_pending = False

        def flush() -> None:
            self.flush_pending = False
            parent._flush_events()

        def flush_soon() -> None:
            if not self.flush_pending:
                self.flush_pending = True
                hub.call_later(EVENT_FLUSH_S, flush)

        dispatcher.on_send_buffered = flush_soon
        dispatcher.buffer_limit = EVENT_BATCH_MAX

    def stop(self, parent: Any) -> None:
        # Before Celery's Events step closes the dispatcher, which drops its buffer.
        with contextlib.suppress(Exception):
            parent._flush_events()

    shutdown = stop


def _dispatcher_of(consumer: Any) -> DispatcherThread | None:
    thread = getattr(getattr(consumer, "controller", None), "remixq_dispatcher", None)
    return thread if isinstance(thread, DispatcherThread) else None


def _consumed(worker: Any) -> list[str]:
    """The queues the worker consumes (``-Q``; every queue without it)."""
    try:
        return list(worker.app.amqp.queues.consume_from)
    except AttributeError:
        return list(QUEUES)


def _pool_size(worker: Any) -> int:
    """The worker's pool size (``-c``; with ``--autoscale`` its maximum)."""
    autoscale = getattr(worker, "max_concurrency", None)
    size = autoscale or getattr(worker, "concurrency", None) or 1
    return int(size) if isinstance(size, int) else 1
