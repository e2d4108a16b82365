"""What the request models of both upstreams share (:mod:`worker.models`,
:mod:`worker.relay_models`): field checks, so that both answer a blank prompt or a boolean
number with the same words, and :class:`BlobRef`, the reference a request carries in
place of an image's bytes (the bytes live in :mod:`worker.store.blobs`). Also a job's
tenant and priority, which every producer path checks the same way (docs/tenants.md)."""

from __future__ import annotations

import re
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field


def not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def not_a_boolean(value: Any) -> Any:
    """JSON's ``true`` is not the number 1 (pydantic would take it for one)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


class BlobRef(BaseModel):
    """What a job's request carries in place of an image's bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    blob: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_-]+$")
    content_type: Literal["image/jpeg", "image/png", "image/webp"]
    size: int = Field(gt=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    #: The file name sent upstream (letters, digits, ``-``, ``_`` and the extension).
    name: str = Field(min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_-]+\.(jpg|png|webp)$")


#: A job's priority classes, highest first: between classes the key's send moments go
#: strictly to the higher one.
PRIORITIES = ("interactive", "normal", "bulk")
Priority = Literal["interactive", "normal", "bulk"]
DEFAULT_PRIORITY: Priority = "normal"
#: The tenant of a caller that names none (a bare token, the Python API's default).
DEFAULT_TENANT = "default"
TENANT_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: How much of a bad value an error message quotes.
_QUOTED_CHARS = 40


def check_tenant(name: Any) -> str:
    """A tenant name: 1 to 64 letters, digits, ``_``, ``.`` or ``-``; else ``ValueError``
    with one line (it becomes part of Redis key names, so nothing else may pass)."""
    if not isinstance(name, str) or not TENANT_PATTERN.fullmatch(name):
        raise ValueError(
            f"tenant: must be 1 to 64 letters, digits, '_', '.' or '-', not {_quoted(name)}"
        )
    return name


def check_priority(value: Any) -> Priority:
    """One of :data:`PRIORITIES`; else ``ValueError`` with one line."""
    if not isinstance(value, str) or value not in PRIORITIES:
        raise ValueError(f"priority: must be one of {', '.join(PRIORITIES)}, not {_quoted(value)}")
    return cast(Priority, value)


def _quoted(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _QUOTED_CHARS else text[: _QUOTED_CHARS - 3] + "..."
