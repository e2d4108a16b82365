"""Typed errors for every upstream answer and transport failure, each of one :class:`Family`.

The families (retry, key, permanent) and what they do to a job are in docs/design.md,
"Error families"; the action each one leads to is :mod:`worker.policies.retry`'s table.
``ambiguous`` marks an error after which the upstream may have acted on the request (for
createTask: an unknown outcome). Messages are redacted (:mod:`worker.redaction`) before
they are shortened.
"""

from __future__ import annotations

import enum
import ssl
from collections.abc import Iterable
from typing import ClassVar

import requests
import urllib3.exceptions
from requests.exceptions import ChunkedEncodingError, ContentDecodingError, InvalidJSONError

from worker.redaction import REDACTED, redact

__all__ = ["REDACTED", "redact"]

EXCERPT_CHARS = 160
#: A ``Retry-After`` longer than this is read as this long (5 minutes).
MAX_RETRY_AFTER_S = 300.0


class Family(enum.Enum):
    """What an error means for the job (docs/design.md, "Error families")."""

    #: 429, 500 and other 5xx, network failures, malformed answers.
    RETRY = "retry"
    #: 402 (insufficient credits), 455 (maintenance): the whole key is affected.
    KEY = "key"
    #: 401, 404, 422, 501, 505, other 4xx, and requests that cannot even be built.
    PERMANENT = "permanent"


def excerpt(body: str, limit: int = EXCERPT_CHARS) -> str:
    """A one-line, bounded excerpt of a text (redact it first)."""
    flat = " ".join(body.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class UpstreamError(Exception):
    """An upstream request that did not succeed.

    Parameters:
        message: the explanation (already redacted by whoever built it).
        retry_after: seconds the upstream asked us to wait (``Retry-After``), if any.
    """

    code: ClassVar[str] = "unknown"
    family: ClassVar[Family] = Family.PERMANENT
    #: The upstream may have acted on the request although we got no usable answer.
    ambiguous: bool = False

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        self.message = message
        self.retry_after = retry_after
        super().__init__(f"{self.fail_code}: {message}" if message else self.fail_code)

    @property
    def fail_code(self) -> str:
        """The value stored in the job record's ``fail_code``."""
        return self.code


class RateLimitedError(UpstreamError):
    """429: the request was dropped, not queued."""

    code = "429"
    family = Family.RETRY


class ServerError(UpstreamError):
    """500 (or any other 5xx).

    ``ambiguous`` when the answer is a gateway's page rather than the upstream's own JSON:
    a proxy that timed out (504, 524) may already have passed the request on.
    """

    code = "500"
    family = Family.RETRY

    def __init__(
        self,
        message: str = "",
        *,
        retry_after: float | None = None,
        status: int | None = None,
        ambiguous: bool = False,
    ) -> None:
        self.status = status
        self.ambiguous = ambiguous
        super().__init__(message, retry_after=retry_after)

    @property
    def fail_code(self) -> str:
        return str(self.status) if self.status else self.code


class NetworkError(UpstreamError):
    """No usable answer arrived: refused, reset, timed out, or cut off mid-body."""

    code = "network"
    family = Family.RETRY

    def __init__(self, message: str = "", *, ambiguous: bool) -> None:
        self.ambiguous = ambiguous
        super().__init__(message)


class BadAnswerError(UpstreamError):
    """A success answer we cannot read (not JSON, no task id, no result URLs).

    Ambiguous: for createTask the upstream said yes, so the task may exist.
    """

    code = "bad_response"
    family = Family.RETRY
    ambiguous = True


class InsufficientCreditsError(UpstreamError):
    code = "402"
    family = Family.KEY


class MaintenanceError(UpstreamError):
    code = "455"
    family = Family.KEY


class UnauthorizedError(UpstreamError):
    code = "401"


class NotFoundError(UpstreamError):
    code = "404"


class ValidationFailedError(UpstreamError):
    code = "422"


class GenerationFailedError(UpstreamError):
    code = "501"


class FeatureDisabledError(UpstreamError):
    code = "505"


class UnexpectedCodeError(UpstreamError):
    """A 4xx code the documentation does not list: permanent."""

    def __init__(self, status: int, message: str = "") -> None:
        self.status = status
        super().__init__(message)

    @property
    def fail_code(self) -> str:
        return str(self.status)


class RequestBuildError(UpstreamError):
    """The request could not be built or sent as asked (a bad URL or header setting)."""

    code = "client_error"


#: The documented codes. An undocumented code >= 500 is a server error, any other a
#: permanent :class:`UnexpectedCodeError`.
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


#: Statuses a gateway answers when it gave up on, or lost, the answer of a request it may
#: already have passed on (502 bad gateway, 504 gateway timeout, Cloudflare's 520, 522 and
#: 524): whatever the body, the upstream may have acted on the request.
GATEWAY_STATUSES = frozenset({502, 504, 520, 522, 524})


def error_for_code(code: int, message: str, *, retry_after: float | None = None) -> UpstreamError:
    """The typed error for an upstream ``code`` (from the body or the HTTP status)."""
    if code in GATEWAY_STATUSES:
        return ServerError(message, retry_after=retry_after, status=code, ambiguous=True)
    cls = ERRORS_BY_CODE.get(code)
    if cls is ServerError or (cls is None and code >= 500):
        return ServerError(message, retry_after=retry_after, status=code)
    if cls is None:
        return UnexpectedCodeError(code, message)
    return cls(message, retry_after=retry_after)


def _cause_chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        for arg in getattr(current, "args", ()):
            if isinstance(arg, BaseException):
                yield arg
                reason = getattr(arg, "reason", None)
                if isinstance(reason, BaseException):
                    yield reason
        current = current.__cause__ or current.__context__


def _never_sent(exc: Exception) -> bool:
    """Whether the connection failed before any byte of the request could be sent (the
    server was not reached, or its certificate was refused)."""
    return any(
        isinstance(
            e,
            urllib3.exceptions.NewConnectionError
            | ConnectionRefusedError
            | ssl.SSLCertVerificationError,
        )
        for e in _cause_chain(exc)
    )


def error_for_exception(exc: Exception, where: str) -> UpstreamError:
    """The typed error for a failed request (every exception of urllib3, ``requests`` or
    of building the request lands in a family).

    Parameters:
        exc: what the transport raised.
        where: the base URL, for the message (never a header or a body).
    """
    name = type(exc).__name__
    u3 = urllib3.exceptions
    if isinstance(exc, u3.NewConnectionError):  # before its base class, ConnectTimeoutError
        return NetworkError(f"cannot connect to {where} ({name})", ambiguous=False)
    if isinstance(exc, requests.ConnectTimeout | u3.ConnectTimeoutError):
        return NetworkError(f"connect timeout to {where}", ambiguous=False)
    if isinstance(exc, requests.ReadTimeout | u3.ReadTimeoutError):
        return NetworkError(f"no answer from {where} in time", ambiguous=True)
    garbled = (ChunkedEncodingError, ContentDecodingError, u3.DecodeError, u3.IncompleteRead)
    if isinstance(exc, (*garbled, u3.InvalidChunkLength)):
        return NetworkError(f"answer from {where} cut off or garbled ({name})", ambiguous=True)
    if isinstance(exc, requests.ConnectionError | u3.ProtocolError | u3.SSLError | u3.ProxyError):
        if _never_sent(exc):
            return NetworkError(f"cannot connect to {where} ({name})", ambiguous=False)
        return NetworkError(f"connection to {where} broke ({name})", ambiguous=True)
    if isinstance(exc, InvalidJSONError):
        return RequestBuildError(f"request body is not JSON-serialisable ({name})")
    if isinstance(exc, u3.HTTPError | OSError) and not isinstance(exc, u3.LocationValueError):
        return NetworkError(f"connection to {where} broke ({name})", ambiguous=True)
    # InvalidHeader, InvalidURL, a bad header value, ... : a setting is wrong.
    # Their text may quote a header (the key), so only the class name is kept.
    return RequestBuildError(f"request to {where} could not be made ({name})")


class JobFailed(Exception):
    """Stored as the Celery result of a job that ended in ``failed`` or ``cancelled``."""

    def __init__(self, fail_code: str, fail_msg: str = "") -> None:
        self.fail_code = fail_code
        self.fail_msg = fail_msg
        super().__init__(f"{fail_code}: {fail_msg}" if fail_msg else fail_code)
