"""Guards around three paths of kombu's Redis transport that would end a worker.

* restoring held messages (``QoS.restore_unacked``) after the broker connection dropped,
  and acknowledging or rejecting a message on that dead channel: skipped, the messages
  stay unacknowledged in Redis and come back after the visibility timeout as stale copies;
* an item on a queue that is not a kombu message: logged, acknowledged and dropped.

Why, and why nothing is lost: docs/reliability.md, "The broker connection".
"""

from __future__ import annotations

import binascii
import functools
import logging
from collections.abc import Callable
from typing import Any

from kombu.transport import redis as kombu_redis

logger = logging.getLogger(__name__)
_GUARDED = "_remixq_guarded"


def _connection_details_gone(qos: Any) -> bool:
    transport = getattr(qos.channel, "connection", None)
    return transport is None or getattr(transport, "client", None) is None


def install() -> None:
    """Install the guards (once per process; in workers only)."""
    _guard_restore()
    _guard_acknowledgements()
    _guard_unreadable_items()


def _guard_acknowledgements() -> None:
    """A task that ends after the connection dropped acknowledges on the dead channel."""
    for name in ("ack", "reject"):
        original: Callable[..., Any] = getattr(kombu_redis.QoS, name)
        if getattr(original, _GUARDED, False):
            continue
        setattr(kombu_redis.QoS, name, _skip_when_gone(original))


def _skip_when_gone(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def guarded(self: Any, delivery_tag: Any, *args: Any, **kwargs: Any) -> Any:
        if _connection_details_gone(self):
            logger.warning(
                "broker connection gone: message %s stays unacknowledged and comes back "
                "after the visibility timeout, where it is dropped as stale",
                delivery_tag,
            )
            return None
        return original(self, delivery_tag, *args, **kwargs)

    setattr(guarded, _GUARDED, True)
    return guarded


#: What decoding a popped item raises when it is not a message.
_UNREADABLE = (ValueError, TypeError, KeyError, AttributeError, binascii.Error, RecursionError)


def _guard_unreadable_items() -> None:
    original: Callable[..., Any] = kombu_redis.Channel._brpop_read
    if getattr(original, _GUARDED, False):
        return
    _note_held_tags()

    @functools.wraps(original)
    def _brpop_read(self: Any, **options: Any) -> Any:
        self.qos._remixq_held_now = None
        try:
            return original(self, **options)
        except _UNREADABLE as exc:
            logger.error(
                "dropped an unreadable message from the broker (%s: %s); a job it may "
                "have carried is sent again by the schedule",
                type(exc).__name__,
                str(exc)[:200],
            )
            # Read far enough to be recorded as held: acknowledge it, or the
            # visibility sweep would bring it back again and again.
            tag = getattr(self.qos, "_remixq_held_now", None)
            if tag is not None:
                self.qos.ack(tag)
            return True

    setattr(_brpop_read, _GUARDED, True)
    kombu_redis.Channel._brpop_read = _brpop_read  # type: ignore[method-assign]


def _note_held_tags() -> None:
    """Let the guard above know which message the read it wraps recorded as held."""
    original: Callable[..., Any] = kombu_redis.QoS.append

    @functools.wraps(original)
    def append(self: Any, message: Any, delivery_tag: Any) -> Any:
        result = original(self, message, delivery_tag)
        self._remixq_held_now = delivery_tag
        return result

    kombu_redis.QoS.append = append  # type: ignore[method-assign]


def _guard_restore() -> None:
    original: Callable[..., Any] = kombu_redis.QoS.restore_unacked
    if getattr(original, _GUARDED, False):
        return

    @functools.wraps(original)
    def restore_unacked(self: Any, client: Any = None) -> Any:
        if client is None and _connection_details_gone(self):
            logger.warning(
                "broker connection gone: %d held message(s) stay unacknowledged in Redis "
                "and are delivered again after the visibility timeout",
                len(self._delivered),
            )
            self._delivered.clear()
            return None
        return original(self, client)

    setattr(restore_unacked, _GUARDED, True)
    kombu_redis.QoS.restore_unacked = restore_unacked  # type: ignore[method-assign]
