"""Reading ``multipart/form-data`` bodies (the upload and legacy remix endpoints).

The standard library's e-mail parser reads MIME multipart bodies, so the sandbox needs no
extra package for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from email import policy
from email.parser import BytesParser


class MultipartError(ValueError):
    """The body is not a readable ``multipart/form-data`` body."""


@dataclass(frozen=True)
class Part:
    """One field of a form: its name, its bytes, and for a file its name and type."""

    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None


def parse_form(content_type: str | None, body: bytes) -> dict[str, list[Part]]:
    """The parts of a ``multipart/form-data`` body by field name (a field may repeat)."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        raise MultipartError("Content-Type must be multipart/form-data")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise MultipartError("body is not multipart")
    form: dict[str, list[Part]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            raise MultipartError("a part has no name")
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        filename = part.get_filename()
        declared = part.get("Content-Type")
        form.setdefault(name, []).append(
            Part(name, data, filename, part.get_content_type() if declared else None)
        )
    return form
