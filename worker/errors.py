"""Typed errors for every documented upstream code.

Each upstream answer that is not a success becomes one exception class. Whether
an error is worth another attempt is decided once, here, by the family it
belongs to (:class:`RetryableUpstreamError` or :class:`PermanentUpstreamError`),
never by the callers.

Messages are built from the upstream's own ``msg`` and pass through
:func:`redact`, so an upstream (or proxy) that echoes the API key back cannot
carry it into a log line, the job record or a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

REDACTED = "[redacted]"
EXCERPT_CHARS = 160


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Return ``text`` with every non-empty secret replaced by ``[redacted]``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def excerpt(body: str, limit: int = EXCERPT_CHARS) -> str:
    """A one-line, bounded excerpt of a response body for error messages."""
    flat = " ".join(body.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class UpstreamError(Exception):
    """An upstream request that did not succeed.

    Parameters:
        message: the upstream's explanation (already redacted by the client).
        retry_after: seconds the upstream asked us to wait (``Retry-After``), if any.
    """

    code: ClassVar[str] = "unknown"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        self.message = message
        self.retry_after = retry_after
        super().__init__(f"{self.code}: {message}" if message else self.code)

    @property
    def fail_code(self) -> str:
        """The value stored in the job record's ``fail_code``."""
        return self.code


class RetryableUpstreamError(UpstreamError):
    """Worth another attempt after a backoff: 429, 455, 5xx and network failures."""

    retryable = True


class PermanentUpstreamError(UpstreamError):
    """Another attempt would get the same answer: the job fails with the code."""


class RateLimitedError(RetryableUpstreamError):
    """429: the request was dropped, not queued."""

    code = "429"


class MaintenanceError(RetryableUpstreamError):
    """455: the service is under maintenance."""

    code = "455"


class ServerError(RetryableUpstreamError):
    """500 (or any other 5xx, or a non-JSON proxy error page)."""

    code = "500"

    def __init__(
        self, message: str = "", *, retry_after: float | None = None, status: int | None = None
    ) -> None:
        self.status = status
        super().__init__(message, retry_after=retry_after)

    @property
    def fail_code(self) -> str:
        return str(self.status) if self.status else self.code


class NetworkError(RetryableUpstreamError):
    """The request did not get an answer: refused, reset or timed out.

    After a read timeout or a reset the upstream may still have created the
    task (see the never-paying-twice note in :mod:`worker.tasks`).
    """

    code = "network"


class UnauthorizedError(PermanentUpstreamError):
    code = "401"


class InsufficientCreditsError(PermanentUpstreamError):
    code = "402"


class NotFoundError(PermanentUpstreamError):
    code = "404"


class ValidationFailedError(PermanentUpstreamError):
    code = "422"


class GenerationFailedError(PermanentUpstreamError):
    code = "501"


class FeatureDisabledError(PermanentUpstreamError):
    code = "505"


class UnexpectedResponseError(PermanentUpstreamError):
    """A 4xx code the documentation does not list, or a malformed success body."""

    def __init__(self, code: str, message: str = "") -> None:
        self._code = code
        super().__init__(message)

    @property
    def fail_code(self) -> str:
        return self._code


ERRORS_BY_CODE: dict[int, type[UpstreamError]] = {
    401: UnauthorizedError,
    402: InsufficientCreditsError,
    404: NotFoundError,
    422: ValidationFailedError,
    429: RateLimitedError,
    455: MaintenanceError,
    500: ServerError,
    501: GenerationFailedError,
    505: FeatureDisabledError,
}


def error_for_code(code: int, message: str, *, retry_after: float | None = None) -> UpstreamError:
    """The typed error for an upstream ``code``.

    Documented codes map to their class. An undocumented code >= 500 is treated
    as a server error (retryable); any other undocumented code is permanent.
    """
    cls = ERRORS_BY_CODE.get(code)
    if cls is ServerError or (cls is None and code >= 500):
        return ServerError(message, retry_after=retry_after, status=code)
    if cls is None:
        return UnexpectedResponseError(str(code), message)
    return cls(message, retry_after=retry_after)


class JobFailed(Exception):
    """Stored as the Celery result of a job that ended in ``failed``."""

    def __init__(self, fail_code: str, fail_msg: str = "") -> None:
        self.fail_code = fail_code
        self.fail_msg = fail_msg
        super().__init__(f"{fail_code}: {fail_msg}" if fail_msg else fail_code)
