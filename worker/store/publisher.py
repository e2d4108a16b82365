"""Sending the pipeline's messages by task name, so no module needs to import the tasks.

``remix.submit`` carries the job's request (so Flower shows what the job is) and the
dispatch token that entitles it to act on the job; its Celery task id is the job id.
``remix.poll`` carries a batch of jobs, each with its token and due time.
``remix.notify`` carries one finished job's completion webhook: the job id, the webhook's
token and its receiver (``scheme://host:port``, never the full URL, which may hold a
secret of the producer's).
``remix.archive`` carries one succeeded job whose result images are to be archived: the
job id and its archive token.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from celery import Celery

from worker.store.clock import Clock

T = TypeVar("T")
#: The upstream a ``remix.submit`` without a ``provider`` argument is for.
DEFAULT_PROVIDER = "kie"
SUBMIT_TASK = "remix.submit"
POLL_TASK = "remix.poll"
NOTIFY_TASK = "remix.notify"
ARCHIVE_TASK = "remix.archive"
SUBMIT_QUEUE = "submit"
POLL_QUEUE = "poll"
NOTIFY_QUEUE = "notify"
ARCHIVE_QUEUE = "archive"
#: Message header holding when the message was sent (fleet clock), so the dispatcher can
#: tell whether a job's message may still be waiting behind it.
SENT_AT_HEADER = "remixq_sent_at"
#: How long task events may wait to be sent together, and how many at most.
EVENT_FLUSH_S = 0.05
EVENT_BATCH_MAX = 500
#: The broker connection of :meth:`Publisher.batch`: a round trip is never sent twice by
#: the client on its own (a retried pipeline could deliver every message of it twice).
BATCH_TRANSPORT = {"retry_on_timeout": False}
#: Most Redis commands of one batch's round trip (a dispatcher round sends at most
#: a few hundred messages).
BATCH_MAX_COMMANDS = 2000
#: A publish that fails is tried again this much before the caller hears of it (the
#: schedule sends the job later in any case).
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.4}

logger = logging.getLogger("worker.publisher")


class Publisher:
    """Publishes the pipeline's messages through ``app``'s broker.

    Each is sent ``ignore_result`` as its task is declared: else Celery's result backend
    would subscribe to each message's result channel here, where nothing waits for one.

    Parameters:
        app: the Celery app whose broker the messages go to.
        clock: the fleet's clock, for each message's send time.
    """

    def __init__(self, app: Celery, clock: Clock) -> None:
        self.app = app
        self.clock = clock
        self._local = threading.local()
        self._announcer = Announcer(app)

    @contextlib.contextmanager
    def producer(self) -> Iterator[Any]:
        """One pooled broker producer for several messages. Their ``task-sent`` events
        go out together (one PUBLISH, not one per message), with those of this thread's
        earlier messages, once the oldest has waited :data:`EVENT_FLUSH_S`; a thread
        that sends often calls :meth:`flush_events` when it has nothing to send."""
        with self.app.producer_or_acquire() as producer, self._collecting(producer):
            yield producer

    @contextlib.contextmanager
    def batch(self) -> Iterator[Any]:
        """A producer whose messages go out together, in one round trip, when the block
        ends (a dispatcher's round: a publish per message was most of its time). A failed
        round trip raises, and then any of the messages may have been delivered or not:
        the caller makes them all due again, and a copy delivered anyway is dropped as
        stale by its dispatch token.

        The connection is this thread's own, without the broker's retry on timeout: kombu
        batches only where a round trip is never sent twice on its own.
        """
        producer = getattr(self._local, "batch_producer", None)
        if producer is None:
            connection = self.app.connection_for_write(transport_options=BATCH_TRANSPORT)
            producer = self._local.batch_producer = self.app.amqp.Producer(connection)
        try:
            with self._collecting(producer), producer.batch(max_size=BATCH_MAX_COMMANDS):
                yield producer
        except BaseException:
            self._local.batch_producer = None  # a broken connection is not used again
            with contextlib.suppress(Exception):
                producer.connection.release()
            raise

    @contextlib.contextmanager
    def _collecting(self, producer: Any) -> Iterator[None]:
        """Hold the ``task-sent`` events of the messages sent meanwhile; send them (with
        this thread's earlier ones) over ``producer`` at the end if the oldest is due."""
        events = self._pending()
        self._local.collecting = True
        try:
            yield
        finally:
            self._local.collecting = False
            if events.due():
                events.send(self.app, producer)

    def flush_events(self, *, now: bool = False) -> None:
        """Send this thread's held ``task-sent`` events if the oldest has waited long
        enough (``now``: whatever their age). Best effort, as every event."""
        events = self._pending()
        if not events.events or not (now or events.due()):
            return
        events.send_pooled(self.app)

    def _pending(self) -> SentEvents:
        events: SentEvents | None = getattr(self._local, "pending", None)
        if events is None:
            events = self._local.pending = SentEvents()
        return events

    def _options(self) -> dict[str, Any]:
        """What every message of this thread's current :meth:`producer` is sent with."""
        if not getattr(self._local, "collecting", False):
            return {}
        return {"event_dispatcher": self._pending()}

    def send_each(
        self,
        items: Sequence[T],
        send: Callable[[T, Any], None],
        unsent: Callable[[list[T]], Any],
    ) -> None:
        """``send(item, producer)`` for each item over one producer; when the broker
        refuses, ``unsent(the items not sent)`` runs and the error is raised."""
        sent = 0
        try:
            with self.producer() as producer:
                for item in items:
                    send(item, producer)
                    sent += 1
        except BaseException:
            unsent(list(items[sent:]))
            raise

    def submit(
        self,
        job_id: str,
        request: Any,
        token: int,
        *,
        producer: Any = None,
        retry: bool = True,
        provider: str = DEFAULT_PROVIDER,
    ) -> None:
        kwargs: dict[str, Any] = {"request": request, "job_id": job_id, "dispatch": token}
        if provider != DEFAULT_PROVIDER:  # kie.ai's messages stay as they always were
            kwargs["provider"] = provider
        self._send(
            SUBMIT_TASK,
            SUBMIT_QUEUE,
            kwargs,
            producer,
            retry,
            task_id=job_id,
            kwargsrepr=_submit_repr(job_id, request, token),
        )

    def announce(self, jobs: Sequence[tuple[str, Any]]) -> None:
        """Tell Flower (a ``task-sent`` event each) of new jobs ``(job_id, request)`` that
        wait in line: their ``remix.submit`` is sent only when a send moment picks them, and
        until then Flower would not know them. The events go out at most
        :data:`EVENT_FLUSH_S` later, with those of the other jobs enqueued meanwhile
        (:class:`Announcer`). Best effort: a broker error is not raised (the job is queued;
        Flower learns of it when it is sent)."""
        if not jobs or not self.app.conf.task_send_sent_event:
            return
        self._announcer.add(
            {
                "uuid": job_id,
                "root_id": job_id,
                "parent_id": None,
                "name": SUBMIT_TASK,
                "args": "()",
                "kwargs": _submit_repr(job_id, request, 0),
                "retries": 0,
                "eta": None,
                "expires": None,
                "queue": SUBMIT_QUEUE,
                "exchange": "",
                "routing_key": SUBMIT_QUEUE,
            }
            for job_id, request in jobs
        )

    def poll(
        self, jobs: Sequence[tuple[str, int, float]], *, producer: Any = None, retry: bool = True
    ) -> None:
        kwargs = {"jobs": [list(job) for job in jobs]}
        self._send(POLL_TASK, POLL_QUEUE, kwargs, producer, retry, kwargsrepr=poll_repr(jobs))

    def notify(
        self, job_id: str, token: int, receiver: str, *, producer: Any = None, retry: bool = True
    ) -> None:
        kwargs = {"job_id": job_id, "dispatch": token, "receiver": receiver}
        self._send(NOTIFY_TASK, NOTIFY_QUEUE, kwargs, producer, retry, kwargsrepr=repr(kwargs))

    def archive(self, job_id: str, token: int, *, producer: Any = None, retry: bool = True) -> None:
        kwargs = {"job_id": job_id, "dispatch": token}
        self._send(ARCHIVE_TASK, ARCHIVE_QUEUE, kwargs, producer, retry)

    def _send(
        self,
        name: str,
        queue: str,
        kwargs: dict[str, Any],
        producer: Any,
        retry: bool,
        **options: Any,
    ) -> None:
        """``send_task`` as every message of the pipeline is sent: with its send time, the
        publish retry policy, ``ignore_result`` (see the class), and its ``task-sent``
        event held when a :meth:`producer` or :meth:`batch` block collects them."""
        self.app.send_task(
            name,
            kwargs=kwargs,
            queue=queue,
            producer=producer,
            retry=retry,
            retry_policy=PUBLISH_RETRY_POLICY,
            ignore_result=True,
            headers={SENT_AT_HEADER: self.clock.now()},
            **options,
            **self._options(),
            **_declared_on(producer, self.app.amqp.queues.get(queue)),
        )


def _declared_on(producer: Any, queue: Any) -> dict[str, Any]:
    """``declare=[]`` when ``producer``'s connection has declared ``queue`` already.

    Celery asks to declare a message's queue at every publish; kombu skips a queue its
    connection declared, but only after binding a copy of it, which was a tenth of a
    dispatcher's publish. A new connection starts with nothing declared, so each still
    declares every queue before its first message to it. (kombu's ``declaration_cached``
    looks the queue itself up in that set, which holds the queues' hashes.)
    """
    if producer is None or queue is None:  # no producer: Celery takes one of its own
        return {}
    return {"declare": []} if hash(queue) in producer.connection.declared_entities else {}


class SentEvents:
    """The ``task-sent`` events of several messages, sent as one ``task.multi`` batch.

    Celery's ``send_task`` hands each message's event to the ``event_dispatcher`` it is
    given, whose :meth:`publish` would send it at once; this one keeps it. Flower reads a
    batch as it reads single events. Best effort, like Celery's own: an event the broker
    refuses is dropped, never the message.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._first_at = 0.0

    def publish(self, type: str, fields: dict[str, Any], producer: Any, **_: Any) -> None:
        if not self.events:
            self._first_at = time.monotonic()
        self.events.append((type, dict(fields)))

    def due(self) -> bool:
        """Whether the held events should go now: the oldest has waited long enough, or
        there are many."""
        if not self.events:
            return False
        waited = time.monotonic() - self._first_at
        return waited >= EVENT_FLUSH_S or len(self.events) >= EVENT_BATCH_MAX

    def send_pooled(self, app: Celery) -> None:
        """:meth:`send` over a producer of ``app``'s pool; a broker that is away drops the
        events (nothing else is lost)."""
        if not self.events:
            return
        try:
            with app.producer_or_acquire() as producer:
                self.send(app, producer)
        except Exception as exc:
            logger.debug("%d task-sent event(s) not sent: %s", len(self.events), exc)
            self.events.clear()

    def send(self, app: Celery, producer: Any) -> None:
        if not self.events:
            return
        events, self.events = self.events, []
        try:
            with app.events.Dispatcher(
                producer.connection,
                channel=producer.channel,
                buffer_while_offline=False,
                buffer_group=["task"],
                buffer_limit=len(events) + 1,
            ) as dispatcher:
                for type, fields in events:
                    dispatcher.send(type, **fields)
                dispatcher.flush(errors=False)
        except Exception as exc:
            logger.debug("%d task-sent event(s) not sent: %s", len(events), exc)


class Announcer:
    """The ``task-sent`` events of a process's new jobs, sent together by a daemon thread
    :data:`EVENT_FLUSH_S` after the first of them: one PUBLISH for every job a producer
    enqueued meanwhile, and none in the enqueue's own path (a PUBLISH per enqueue was half
    of what an enqueue cost). Events still held when the process exits are sent then; a
    forked process starts with none of its parent's (nor its lock, maybe held at the fork).
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._forked()
        forked = weakref.WeakMethod(self._forked)
        os.register_at_fork(after_in_child=lambda: (method := forked()) and method())

    def _forked(self) -> None:
        """A fresh start: nothing held, no thread yet (a forked child has neither)."""
        self._started = False
        self._lock = threading.Lock()
        self._sending = threading.Lock()
        self._held = SentEvents()
        self._wake = threading.Event()

    def add(self, events: Iterable[dict[str, Any]]) -> None:
        """Hold the ``task-sent`` events ``events`` (their fields) for the next send."""
        with self._lock:
            self._start_once()
            for fields in events:
                self._held.publish("task-sent", fields, None)
        self._wake.set()

    def flush(self) -> None:
        """Send what is held now, after a send under way (so that the flush at exit waits
        for the thread's). Best effort, as every event."""
        with self._sending:
            with self._lock:
                held, self._held = self._held, SentEvents()
                self._wake.clear()
            held.send_pooled(self.app)

    def _start_once(self) -> None:
        """Start this process's sending thread (called with the lock held)."""
        if self._started:
            return
        self._started = True
        thread = threading.Thread(target=self._run, name="remixq-announcer", daemon=True)
        thread.start()
        atexit.register(self.flush)

    def _run(self) -> None:
        wake = self._wake
        while True:
            wake.wait()
            time.sleep(EVENT_FLUSH_S)  # the jobs enqueued meanwhile go in the same PUBLISH
            self.flush()


#: Most characters of the prompt shown with a submit in Flower (whole words, then "…").
PROMPT_PREVIEW_CHARS = 60
#: Most job ids a poll names in Flower (a batch holds up to 25; the rest are counted).
POLL_IDS_SHOWN = 25


def _submit_repr(job_id: str, request: Any, token: int) -> str:
    """What Flower shows of a submit: the job id and the prompt's first words, never the
    image URLs (a signed URL is a credential) nor anything else of the request."""
    prompt = request.get("prompt", "") if isinstance(request, dict) else ""
    return repr({"prompt": prompt_preview(str(prompt)), "job_id": job_id, "dispatch": token})


def prompt_preview(prompt: str, limit: int = PROMPT_PREVIEW_CHARS) -> str:
    """The prompt's first words, at most ``limit`` characters, on one line."""
    words = " ".join(prompt.split())
    if len(words) <= limit:
        return words
    cut = words[: limit + 1].rsplit(" ", 1)[0] if " " in words[:limit] else words[:limit]
    return cut.rstrip() + "…"


def poll_repr(jobs: Sequence[tuple[str, int, float]]) -> str:
    """What Flower shows of a poll: the job ids of its batch (Flower's search finds them)."""
    ids = [job[0] for job in jobs]
    shown: dict[str, Any] = {"job_ids": ids[:POLL_IDS_SHOWN]}
    if len(ids) > POLL_IDS_SHOWN:
        shown["more"] = len(ids) - POLL_IDS_SHOWN
    return repr(shown)
