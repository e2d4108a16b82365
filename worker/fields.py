"""What the request models of both upstreams share (:mod:`worker.models`,
:mod:`worker.relay_models`): field checks, so that both answer a blank prompt or a boolean
number with the same words, and :class:`BlobRef`, the reference a request carries in
place of an image's bytes (the bytes live in :mod:`worker.store.blobs`)."""

from __future__ import annotations

from typing import Any, Literal

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


#: Priority classes, highest first: between classes strictly, inside one by fair share.
PRIORITIES = ("interactive", "normal", "bulk")
DEFAULT_TENANT = "default"
DEFAULT_PRIORITY = "normal"
