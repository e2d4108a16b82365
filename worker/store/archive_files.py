"""Where archived result images go: a directory or an S3 bucket (``REMIX_ARCHIVE_URL``).

Both sit behind one small protocol, :class:`ArchiveStore`: ``put(name, data,
content_type)`` stores ``data`` under ``name`` (``<job_id>/<n>.<ext>``) and answers its
location. Writes are idempotent and atomic (a directory write goes to a temporary file,
then is renamed). The archive step is :mod:`worker.policies.archive`; the design:
docs/design.md, "Result archiving".
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from worker.settings import Settings

#: Longest wait for the store's connection, and for each of its answers (S3); with its
#: attempts, one write ends well within the minute a step's lease gives it.
S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 20.0
S3_MAX_ATTEMPTS = 2


class ArchiveStore(Protocol):
    """A place archived images are written to."""

    def put(self, name: str, data: bytes, content_type: str) -> str:
        """Store ``data`` under ``name`` (``<job_id>/<n>.<ext>``); returns its location."""
        ...


class ArchiveError(Exception):
    """The archive refused a write; ``str()`` is one line without credentials."""


def check_name(name: str) -> str:
    """``name`` when it is ``<job_id>/<file>`` inside the archive; ``ValueError`` otherwise."""
    parts = name.split("/")
    if len(parts) != 2 or any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise ValueError(f"archive names are <job_id>/<file>, got {name!r}")
    return name


class DirectoryArchive:
    """Files under one directory (``file:///abs/dir``), one subdirectory per job."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def put(self, name: str, data: bytes, content_type: str) -> str:
        target = self.root / check_name(name)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._write_atomically(target, data)
        except OSError as exc:
            raise ArchiveError(
                f"cannot write {target} ({exc.strerror or type(exc).__name__})"
            ) from None
        return target.as_uri()

    @staticmethod
    def _write_atomically(target: Path, data: bytes) -> None:
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


class S3Archive:
    """Objects in one S3 (or S3-compatible) bucket, under an optional prefix.

    Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID``, shared files, an
    instance role), never from remixq's settings, and never reach a log line.
    """

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = Config(
            connect_timeout=S3_CONNECT_TIMEOUT_S,
            read_timeout=S3_READ_TIMEOUT_S,
            retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
        )
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)

    def key_of(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def put(self, name: str, data: bytes, content_type: str) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        key = self.key_of(check_name(name))
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise ArchiveError(
                f"S3 refused the write of s3://{self.bucket}/{key} ({code})"
            ) from None
        except BotoCoreError as exc:
            raise ArchiveError(f"S3 write failed ({type(exc).__name__})") from None
        return f"s3://{self.bucket}/{key}"


def archive_store(settings: Settings) -> ArchiveStore | None:
    """The store ``REMIX_ARCHIVE_URL`` names (None: archiving is off)."""
    url = settings.remix_archive_url
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme == "file":
        return DirectoryArchive(unquote(parts.path))
    return S3Archive(
        parts.netloc, unquote(parts.path), endpoint_url=settings.remix_archive_s3_endpoint_url
    )
