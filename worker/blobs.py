"""Image bytes between a producer and the worker that sends them: the blob store.

Celery messages stay small: a producer stores a source image here and the job's request
carries a :class:`BlobRef` (id, type, size, digest), never the bytes. The worker reads the
bytes just before it sends them upstream, and the blobs of a job are deleted once it has
finished. By default blobs are Redis keys with a time to live of at least the submit
deadline.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from typing import Literal, Protocol

import redis
from pydantic import BaseModel, ConfigDict, Field

from worker import keys


class BlobRef(BaseModel):
    """What a job's request carries in place of an image's bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    blob: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_-]+$")
    content_type: Literal["image/jpeg", "image/png", "image/webp"]
    size: int = Field(gt=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    #: The file name sent upstream (letters, digits, ``-``, ``_`` and the extension).
    name: str = Field(min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_-]+\.(jpg|png|webp)$")


class BlobMissing(Exception):
    """A blob is gone (expired or deleted): its job cannot be sent."""


class BlobStore(Protocol):
    def put(self, data: bytes, content_type: str, name: str) -> BlobRef: ...

    def get(self, ref: BlobRef) -> bytes: ...

    def delete(self, refs: Iterable[BlobRef]) -> None: ...


def new_ref(data: bytes, content_type: str, name: str) -> BlobRef:
    return BlobRef(
        blob=uuid.uuid4().hex,
        content_type=content_type,  # type: ignore[arg-type]
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        name=name,
    )


class RedisBlobStore:
    """Blobs as Redis strings with a time to live (``ttl_s``)."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s

    def put(self, data: bytes, content_type: str, name: str) -> BlobRef:
        ref = new_ref(data, content_type, name)
        self.redis.set(keys.blob(ref.blob), data, ex=self.ttl_s)
        return ref

    def get(self, ref: BlobRef) -> bytes:
        data = self.redis.get(keys.blob(ref.blob))
        if not isinstance(data, bytes):
            raise BlobMissing(f"image {ref.name} ({ref.blob}) is no longer stored")
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise BlobMissing(f"image {ref.name} ({ref.blob}) does not match its digest")
        return data

    def delete(self, refs: Iterable[BlobRef]) -> None:
        names = [keys.blob(ref.blob) for ref in refs]
        if names:
            self.redis.delete(*names)
