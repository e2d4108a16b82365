"""Blobs in S3 or an S3-compatible store (``REMIX_BLOB_URL=s3://bucket/prefix``).

For fleets whose producers and workers share no Redis they may fill, or no directory:
one object per blob under ``prefix``. The endpoint and credentials come from boto3's own
configuration (``AWS_ENDPOINT_URL_S3`` for an S3-compatible server, ``AWS_ACCESS_KEY_ID``
..., an instance role), never from remixq's settings. S3 has no per-object time to live:
a lifecycle rule on the prefix (expire after 2 days, say) is the safety net that the
Redis store's TTL is; finished jobs delete their blobs as with every store. Errors of
boto3 become :class:`~worker.store.blobs.BlobStoreError` (one line, no secret).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from worker.fields import BlobRef
from worker.store.blobs import BlobStoreError, checked_blob

#: ``DeleteObjects`` takes at most this many keys.
DELETE_BATCH = 1000
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


class S3BlobStore:
    """Blobs as objects ``<prefix><blob id>`` in ``bucket``."""

    def __init__(self, bucket: str, prefix: str, client: Any = None) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.client = client if client is not None else boto3.client("s3")

    def store(self, blobs: Sequence[tuple[BlobRef, bytes]]) -> None:
        stored: list[BlobRef] = []
        try:
            for ref, data in blobs:
                self.client.put_object(
                    Bucket=self.bucket, Key=self._key(ref), Body=data, ContentType=ref.content_type
                )
                stored.append(ref)
        except (BotoCoreError, ClientError) as exc:
            self._forget(stored)  # all of them or none
            raise BlobStoreError(
                f"cannot store an image in s3://{self.bucket}: {_say(exc)}"
            ) from None

    def get(self, ref: BlobRef) -> bytes:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._key(ref))
            data: bytes | None = answer["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in MISSING_CODES:
                raise BlobStoreError(f"cannot read image {ref.name}: {_say(exc)}") from None
            data = None
        except BotoCoreError as exc:
            raise BlobStoreError(f"cannot read image {ref.name}: {_say(exc)}") from None
        return checked_blob(ref, data)

    def delete(self, refs: Iterable[BlobRef]) -> None:
        try:
            self._delete([self._key(ref) for ref in refs])
        except (BotoCoreError, ClientError) as exc:
            raise BlobStoreError(f"cannot delete images: {_say(exc)}") from None

    def _key(self, ref: BlobRef) -> str:
        return self.prefix + ref.blob

    def _delete(self, names: list[str]) -> None:
        for start in range(0, len(names), DELETE_BATCH):
            batch = [{"Key": name} for name in names[start : start + DELETE_BATCH]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})

    def _forget(self, refs: list[BlobRef]) -> None:
        with contextlib.suppress(BotoCoreError, ClientError):  # else the lifecycle rule
            self._delete([self._key(ref) for ref in refs])


def _say(exc: Exception) -> str:
    """boto3's error as one line: its code, or its class name (no request details)."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code") or "error")
    return type(exc).__name__
