"""Source images given as files: what is accepted, checked by content, never by name.

Producers read a file (or take bytes) here, before anything is enqueued, so a bad file
gets one line naming what is wrong and nothing is written. The worker never reads a
path: only the bytes a producer stored in the blob store (:mod:`worker.store.blobs`).
:func:`is_complete_image` is the archive's check that a downloaded result is whole.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from worker.models import InvalidRequestError

#: Largest source image accepted (the upstreams take at most 10 MB).
MAX_IMAGE_BYTES = 10 * 1000 * 1000
EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}


def sniff_image_type(data: bytes) -> str | None:
    """``image/jpeg``, ``image/png`` or ``image/webp`` by the file's magic bytes; else None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def is_complete_image(data: bytes, content_type: str) -> bool:
    """Whether ``data`` (sniffed as ``content_type``) is whole, cheaply, by its structure.

    Not a decoder: a PNG must be a chain of chunks from ``IHDR`` to an ``IEND`` that ends
    the data, a JPEG must end with its end-of-image marker (``FFD9``), a WebP's RIFF size
    must equal its length. A body cut short, or a page behind an image's magic bytes,
    fails; a file that is whole but corrupt inside may pass.
    """
    if content_type == "image/png":
        return _png_chunks_complete(data)
    if content_type == "image/jpeg":
        return len(data) > 4 and data.startswith(b"\xff\xd8\xff") and data.endswith(b"\xff\xd9")
    if content_type == "image/webp":
        return len(data) >= 12 and struct.unpack("<I", data[4:8])[0] + 8 == len(data)
    return False


def _png_chunks_complete(data: bytes) -> bool:
    at, first = 8, True
    while at + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        if first and kind != b"IHDR":
            return False
        first = False
        at += 12 + length
        if kind == b"IEND":
            return at == len(data)
    return False


def load_image(
    source: str | os.PathLike[str] | bytes, field: str, name: str | None = None
) -> tuple[bytes, str, str]:
    """Read and check one source image; returns ``(bytes, content_type, file_name)``.

    ``source`` is a path (read here, in the producer) or the bytes themselves; ``name``
    (say, an uploaded file's name) gives bytes a file name stem other than ``image``.
    Raises :class:`~worker.models.InvalidRequestError` with one line naming ``field``.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data, name = bytes(source), Path(name or "image").stem
    elif isinstance(source, str | os.PathLike):
        data, name = _read_file(Path(source), field), Path(source).stem or "image"
    else:
        raise InvalidRequestError(f"invalid request: {field}: must be a file path or bytes")
    content_type = check_image_bytes(data, field)
    return data, content_type, f"{_safe_name(name)}.{EXTENSIONS[content_type]}"


def check_image_bytes(data: bytes, field: str) -> str:
    """The content type of an acceptable image; raises ``InvalidRequestError`` otherwise."""
    if not data:
        raise InvalidRequestError(f"invalid request: {field}: the file is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidRequestError(
            f"invalid request: {field}: {len(data)} bytes is more than the "
            f"{MAX_IMAGE_BYTES} bytes allowed"
        )
    content_type = sniff_image_type(data)
    if content_type is None or not is_complete_image(data, content_type):
        raise InvalidRequestError(
            f"invalid request: {field}: not a whole JPEG, PNG or WebP image (checked by content)"
        )
    return content_type


def _read_file(path: Path, field: str) -> bytes:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise InvalidRequestError(f"invalid request: {field}: {path} is not a regular file")
        if size > MAX_IMAGE_BYTES:
            raise InvalidRequestError(
                f"invalid request: {field}: {path} has {size} bytes, more than the "
                f"{MAX_IMAGE_BYTES} bytes allowed"
            )
        with path.open("rb") as handle:
            return handle.read(MAX_IMAGE_BYTES + 1)
    except FileNotFoundError:
        raise InvalidRequestError(f"invalid request: {field}: no such file {path}") from None
    except PermissionError:
        raise InvalidRequestError(f"invalid request: {field}: cannot read {path}") from None
    except OSError as exc:
        raise InvalidRequestError(
            f"invalid request: {field}: cannot read {path} ({exc.strerror or type(exc).__name__})"
        ) from None


def _safe_name(name: str) -> str:
    """A file name stem safe to send upstream: letters, digits, ``-`` and ``_`` only."""
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in name)
    return cleaned.strip("_")[:64] or "image"
