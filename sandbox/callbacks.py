"""Callback delivery: POST a finished task's record to its ``callBackUrl``, signed when asked."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import urlsplit

import requests

logger = logging.getLogger(__name__)

CALLBACK_TIMEOUT_S = 5.0
CALLBACK_RETRIES = 1
RETRY_DELAY_S = 0.5
SCHEDULER_TICK_S = 0.05
SENDER_THREADS = 4
LOCAL_HOSTNAMES = frozenset({"localhost"})
TIMESTAMP_HEADER = "X-Webhook-Timestamp"
SIGNATURE_HEADER = "X-Webhook-Signature"

Outcome = Literal["sent", "failed", "refused"]


@dataclass(frozen=True)
class Callback:
    """One delivery to make.

    :param task_id: the task the record belongs to (it is part of the signature).
    :param url: the task's ``callBackUrl``.
    :param payload: the JSON body, as recordInfo would answer for the task.
    :param hmac_key: the signing key, or None to send unsigned.
    """

    task_id: str
    url: str
    payload: bytes
    hmac_key: str | None


class CallbackSource(Protocol):
    """Where the dispatcher finds due callbacks and reports how they went."""

    def due_callbacks(self, now: float) -> list[Callback]:
        """Callbacks whose task has reached its final state by ``now``, each handed out once."""
        ...

    def note_callback(self, outcome: Outcome) -> None:
        """Count one finished delivery."""
        ...


def webhook_signature(key: str, task_id: str, timestamp: int) -> str:
    """base64(HMAC-SHA256(key, taskId + "." + timestamp)), as kie.ai signs callbacks.

    :param key: the webhook HMAC key.
    :param task_id: the upstream task id.
    :param timestamp: unix seconds, also sent as ``X-Webhook-Timestamp``.
    """
    message = f"{task_id}.{timestamp}".encode()
    digest = hmac.new(key.encode(), message, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def is_local_url(url: str) -> bool:
    """Whether ``url`` points at this machine (localhost or a loopback address).

    :param url: an http(s) URL.
    """
    host = urlsplit(url).hostname or ""
    if host in LOCAL_HOSTNAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def deliver(callback: Callback) -> Outcome:
    """POST one callback, retrying once; refuse URLs that leave this machine.

    :param callback: what to send where.
    """
    if not is_local_url(callback.url):
        logger.warning(
            "refusing callback for %s to non-local URL %s", callback.task_id, callback.url
        )
        return "refused"
    for attempt in range(1 + CALLBACK_RETRIES):
        if attempt:
            time.sleep(RETRY_DELAY_S)
        if _post(callback):
            return "sent"
    logger.warning("callback for %s to %s failed", callback.task_id, callback.url)
    return "failed"


def _headers(callback: Callback) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if callback.hmac_key is not None:
        timestamp = int(time.time())
        headers[TIMESTAMP_HEADER] = str(timestamp)
        headers[SIGNATURE_HEADER] = webhook_signature(
            callback.hmac_key, callback.task_id, timestamp
        )
    return headers


def _post(callback: Callback) -> bool:
    """One POST attempt; True when the receiver answered 2xx."""
    try:
        with requests.Session() as session:
            session.trust_env = False
            response = session.post(
                callback.url,
                data=callback.payload,
                headers=_headers(callback),
                timeout=CALLBACK_TIMEOUT_S,
                allow_redirects=False,
            )
    except requests.RequestException as exc:
        logger.info("callback for %s to %s: %s", callback.task_id, callback.url, exc)
        return False
    return 200 <= response.status_code < 300


class CallbackDispatcher:
    """A scheduler thread that collects due callbacks and sender threads that deliver them."""

    def __init__(self, source: CallbackSource) -> None:
        """:param source: the sandbox state the callbacks come from."""
        self._source = source
        self._queue: queue.Queue[Callback | None] = queue.Queue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the scheduler and sender threads (daemons); a second call does nothing."""
        if self._threads:
            return
        self._threads.append(threading.Thread(target=self._schedule, name="sandbox-callbacks"))
        for number in range(SENDER_THREADS):
            name = f"sandbox-callback-sender-{number}"
            self._threads.append(threading.Thread(target=self._send, name=name))
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    def stop(self) -> None:
        """Stop collecting; deliveries under way finish in the background."""
        self._stopping.set()
        for _ in range(SENDER_THREADS):
            self._queue.put(None)

    def _schedule(self) -> None:
        while not self._stopping.wait(SCHEDULER_TICK_S):
            for callback in self._source.due_callbacks(time.time()):
                self._queue.put(callback)

    def _send(self) -> None:
        while (callback := self._queue.get()) is not None:
            self._source.note_callback(deliver(callback))
