"""The blob store: source images between a producer and the worker that sends them.

A job's request carries a :class:`BlobRef` (id, type, size, digest), never the bytes. The
bytes live in Redis (:class:`RedisBlobStore`, with a time to live and a cap on the total),
in a shared directory (:class:`FileBlobStore`) or in S3 (:mod:`worker.store.blobs_s3`). A
producer builds the references first (:func:`new_ref`, pure), validates the request, and
only then stores the bytes, so bad input writes nothing.

The design: docs/design.md, "Source images from files".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import redis
from pydantic import ValidationError

from worker import keys
from worker.fields import BlobRef
from worker.lua import load_script


class BlobMissing(Exception):
    """A blob is gone (expired or deleted): its job cannot be sent."""


class BlobStoreError(Exception):
    """The blob store could not be reached or refused a request (one line, no secret)."""


class BlobStoreFull(Exception):
    """Storing the images would take the blobs over ``REMIX_BLOB_MAX_BYTES``; ``str()`` is
    one line. Nothing was stored: the producer may try again once jobs have finished."""


class BlobStore(Protocol):
    def store(self, blobs: Sequence[tuple[BlobRef, bytes]]) -> None:
        """Store every blob, or none (raises :class:`BlobStoreFull` over the cap)."""
        ...

    def get(self, ref: BlobRef) -> bytes: ...

    def delete(self, refs: Iterable[BlobRef]) -> None: ...


def new_ref(data: bytes, content_type: str, name: str) -> BlobRef:
    """The reference of a blob not stored yet (pure: producers validate before writing)."""
    return BlobRef(
        blob=uuid.uuid4().hex,
        content_type=content_type,  # type: ignore[arg-type]
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        name=name,
    )


def put(store: BlobStore, data: bytes, content_type: str, name: str) -> BlobRef:
    """Store one blob; returns its reference."""
    ref = new_ref(data, content_type, name)
    store.store([(ref, data)])
    return ref


def refs_in(request: Any) -> list[BlobRef]:
    """The blobs a job's stored request names (``image_file``, ``reference_image_files``).

    Lenient: whatever is not a valid reference is skipped (used when cleaning up).
    """
    if not isinstance(request, dict):
        return []
    found = [request.get("image_file")]
    more = request.get("reference_image_files")
    if isinstance(more, list):
        found += more
    refs = []
    for raw in found:
        with contextlib.suppress(ValidationError):
            if raw is not None:
                refs.append(BlobRef.model_validate(raw))
    return refs


def checked_blob(ref: BlobRef, data: bytes | None) -> bytes:
    """``data`` read for ``ref``; :class:`BlobMissing` when it is gone or not the same."""
    if data is None:
        raise BlobMissing(f"image {ref.name} ({ref.blob}) is no longer stored")
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise BlobMissing(f"image {ref.name} ({ref.blob}) does not match its digest")
    return data


class RedisBlobStore:
    """Blobs as Redis strings with a time to live (``ttl_s``), at most ``max_bytes`` in all.

    The total is kept by ``blob_put.lua`` and ``blob_delete.lua`` (see their headers).
    """

    def __init__(self, client: redis.Redis, ttl_s: int, max_bytes: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._put = load_script(client, "blob_put")
        self._delete = load_script(client, "blob_delete")

    def store(self, blobs: Sequence[tuple[BlobRef, bytes]]) -> None:
        if not blobs:
            return
        args: list[Any] = [self.max_bytes, self.ttl_s]
        for ref, data in blobs:
            args += [ref.blob, data]
        stored, total = self._put(
            keys=[*_TRACKING, *(keys.blob(ref.blob) for ref, _ in blobs)], args=args
        )
        if not int(stored):
            adding = sum(len(data) for _, data in blobs)
            raise BlobStoreFull(
                f"the blob store is full: {adding} more bytes would exceed "
                f"REMIX_BLOB_MAX_BYTES={self.max_bytes} ({int(total)} bytes held); "
                "try again when jobs have finished"
            )

    def get(self, ref: BlobRef) -> bytes:
        data = self.redis.get(keys.blob(ref.blob))
        return checked_blob(ref, data if isinstance(data, bytes) else None)

    def delete(self, refs: Iterable[BlobRef]) -> None:
        ids = [ref.blob for ref in refs]
        if ids:
            self._delete(keys=[*_TRACKING, *map(keys.blob, ids)], args=ids)


_TRACKING = (keys.BLOB_EXPIRIES, keys.BLOB_SIZES, keys.BLOB_BYTES)


class FileBlobStore:
    """Blobs as files in a directory that producers and workers share (``file:///dir``).

    A file is written under a temporary name and renamed, so a reader never sees half of
    it. There is no time to live on a file system: each store first removes the files
    older than ``ttl_s``. The byte cap is the Redis store's (a disk fills differently).
    """

    def __init__(self, directory: Path, ttl_s: int) -> None:
        self.directory = directory
        self.ttl_s = ttl_s

    def store(self, blobs: Sequence[tuple[BlobRef, bytes]]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._prune()
        for ref, data in blobs:
            final = self._path(ref)
            partial = final.with_name(f".{ref.blob}.partial")
            partial.write_bytes(data)
            os.replace(partial, final)

    def get(self, ref: BlobRef) -> bytes:
        try:
            data: bytes | None = self._path(ref).read_bytes()
        except FileNotFoundError:
            data = None
        return checked_blob(ref, data)

    def delete(self, refs: Iterable[BlobRef]) -> None:
        for ref in refs:
            self._path(ref).unlink(missing_ok=True)

    def _path(self, ref: BlobRef) -> Path:
        return self.directory / ref.blob  # ids are [A-Za-z0-9_-]: no path can escape

    def _prune(self) -> None:
        oldest = time.time() - self.ttl_s
        for path in self.directory.iterdir():
            with contextlib.suppress(OSError):
                if path.is_file() and path.stat().st_mtime < oldest:
                    path.unlink()
