"""Keep secrets out of every text remixq writes: messages, records, results and logs.

:class:`Redactor` replaces a secret's plain value, its escaped forms (``repr``, JSON) and
any run of at least :data:`MIN_FRAGMENT` characters that also stands in a secret; callers
redact *before* they shorten a text. :class:`RedactingFilter` does the same to log
records, the traceback text included. Why: docs/design.md, "Secrets".
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

REDACTED = "[redacted]"
#: Runs at least this long that also stand in a secret are redacted.
MIN_FRAGMENT = 8
#: Every run of MIN_FRAGMENT characters holds a whole block of this many that starts at a
#: multiple of it, so a text none of whose such blocks stands in a secret holds no fragment
#: (most texts: they are ruled out in a quarter of the lookups).
_BLOCK = MIN_FRAGMENT // 2
#: A text's aligned blocks, cut in one C call: consecutive matches start at multiples of
#: :data:`_BLOCK` (this pre-check runs on every log line, see docs/benchmarks.md section 4).
_ALIGNED_BLOCKS = re.compile(f".{{{_BLOCK}}}", re.DOTALL)


def _shapes(secret: str) -> set[str]:
    """The forms a secret may take inside a text."""
    shapes = {secret, repr(secret)[1:-1], json.dumps(secret)[1:-1]}
    shapes |= {s.strip() for s in shapes}
    return {s for s in shapes if s}


class Redactor:
    """Replaces secrets, their escaped forms and long fragments of them with ``[redacted]``.

    Parameters:
        secrets: the secret values; empty and None entries are ignored.
    """

    def __init__(self, secrets: Iterable[str | None]) -> None:
        shapes: set[str] = set()
        for secret in secrets:
            if secret:
                shapes |= _shapes(secret)
        self._shapes = sorted(shapes, key=len, reverse=True)
        self._fragments = {
            shape[i : i + MIN_FRAGMENT]
            for shape in self._shapes
            for i in range(len(shape) - MIN_FRAGMENT + 1)
        }
        self._blocks = {
            shape[i : i + _BLOCK] for shape in self._shapes for i in range(len(shape) - _BLOCK + 1)
        }

    def __bool__(self) -> bool:
        return bool(self._shapes)

    def redact(self, text: str) -> str:
        if not self._shapes or not text:
            return text
        for shape in self._shapes:
            text = text.replace(shape, REDACTED)
        return self._redact_fragments(text) if self._may_hold_fragment(text) else text

    def _may_hold_fragment(self, text: str) -> bool:
        if not self._fragments:
            return False
        return not self._blocks.isdisjoint(_ALIGNED_BLOCKS.findall(text))

    def _redact_fragments(self, text: str) -> str:
        marked = bytearray(len(text))
        for i in range(len(text) - MIN_FRAGMENT + 1):
            if text[i : i + MIN_FRAGMENT] in self._fragments:
                marked[i : i + MIN_FRAGMENT] = b"\1" * MIN_FRAGMENT
        if not any(marked):
            return text
        out: list[str] = []
        i = 0
        while i < len(text):
            if marked[i]:
                while i < len(text) and marked[i]:
                    i += 1
                out.append(REDACTED)
            else:
                out.append(text[i])
                i += 1
        return "".join(out)


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every secret (and escaped form or long fragment of one) redacted."""
    return redactor_for(tuple(secrets)).redact(text)


@functools.lru_cache(maxsize=64)
def redactor_for(secrets: tuple[str | None, ...]) -> Redactor:
    """The :class:`Redactor` of ``secrets``, made once (every upstream answer needs one)."""
    return Redactor(secrets)


class RedactingFilter(logging.Filter):
    """A handler filter that redacts a record's message and traceback before it is written.

    The message is formatted with its arguments and the traceback rendered to text here,
    so that what the handler writes is exactly what was redacted.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.redactor:
            return True
        self._redact_extra(record)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as usual
            return True
        redacted = self.redactor.redact(message)
        if redacted != message:
            self._redact_message(record, redacted)
        if record.exc_info:
            record.exc_text = self._formatter.formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = self.redactor.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redactor.redact(record.stack_info)
        return True

    def _redact_extra(self, record: logging.LogRecord) -> None:
        """Redact the fields given as ``extra`` (structured logs write them out as they are)."""
        fields = vars(record)
        for name in fields.keys() - _STANDARD_ATTRIBUTES:
            value = fields[name]
            if isinstance(value, bool | int | float) or value is None:
                continue
            text = value if isinstance(value, str) else str(value)
            redacted = self.redactor.redact(text)
            if redacted != text:
                fields[name] = redacted  # an extra's name need not be a string

    def _redact_message(self, record: logging.LogRecord, redacted: str) -> None:
        """Redact the format string and each argument, keeping the arguments' shape.

        Some formatters unpack ``record.args`` themselves (uvicorn's access log does), so
        the arguments stay a tuple of the same length when that still renders; otherwise
        the record carries the redacted message alone.
        """
        redact = self.redactor.redact
        msg = redact(record.msg) if isinstance(record.msg, str) else redacted
        args: Any = record.args
        if isinstance(args, tuple):
            args = tuple(_redacted_arg(redact, arg) for arg in args)
        elif isinstance(args, dict):
            args = {key: _redacted_arg(redact, value) for key, value in args.items()}
        record.msg, record.args = msg, args
        try:
            rendered = record.getMessage()
        except Exception:
            rendered = ""
        if not rendered or redact(rendered) != rendered:
            record.msg, record.args = redacted, None


#: What every ``LogRecord`` has; any other attribute came from ``extra`` (or a filter).
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


def _redacted_arg(redact: Callable[[str], str], value: Any) -> Any:
    if isinstance(value, bool | int | float) or value is None:
        return value
    return redact(value if isinstance(value, str) else str(value))


def install_log_redaction(redactor: Redactor, loggers: Iterable[logging.Logger] = ()) -> None:
    """Put a :class:`RedactingFilter` on every handler of the root and the given loggers."""
    targets = [logging.getLogger(), *loggers]
    for logger in targets:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter(redactor))
