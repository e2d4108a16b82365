"""A guard around one step of kombu's Redis transport that can crash a worker.

When the broker connection drops, Celery closes the connection and kombu
tries to put the messages the worker held back on their queues
(``QoS.restore_unacked``). By then the transport has already let go of its
connection details, so kombu 5.7 raises ``AttributeError`` instead of a
connection error; Celery treats that as unrecoverable and the worker exits
instead of reconnecting (seen with Redis restarted under a running fleet).

Skipping that restore loses nothing: the held messages are still recorded as
unacknowledged in Redis, and the visibility-timeout sweep of any live worker
(or this one, once reconnected) delivers them again. No library setting turns
off only this path (``do_restore`` also stops the restore at a warm
shutdown), hence this small wrapper.
"""

from __future__ import annotations

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
    """Wrap ``QoS.restore_unacked`` once per process."""
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
