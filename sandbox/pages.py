"""Error answers that are not JSON: a gateway's HTML page, or a bare server's line of text."""

from __future__ import annotations

from http import HTTPStatus

#: Reason phrases of kie.ai's own codes, where they differ from (or are missing in) HTTP's.
REASONS = {455: "Service Unavailable", 501: "Generation Failed", 505: "Feature Disabled"}
TOO_MANY_REQUESTS = 429
SERVER_ERRORS = 500
FALLBACK_REASON = "Error"


def reason_phrase(status: int) -> str:
    """The reason phrase of ``status``, e.g. ``Payment Required`` for 402.

    :param status: an HTTP status or kie.ai code.
    """
    if status in REASONS:
        return REASONS[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return FALLBACK_REASON


def is_html_page(status: int) -> bool:
    """Whether a gateway answers ``status`` with an HTML page (5xx and 429) rather than text."""
    return status >= SERVER_ERRORS or status == TOO_MANY_REQUESTS


def html_page(status: int) -> bytes:
    """An nginx-style error page naming ``status``, e.g. ``<title>502 Bad Gateway</title>``."""
    title = f"{status} {reason_phrase(status)}"
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()


def text_page(status: int, msg: str) -> bytes:
    """One line of text, e.g. ``402 Payment Required: Insufficient credits``.

    :param status: the HTTP status.
    :param msg: the error message; a leading copy of the reason phrase is not repeated.
    """
    reason = reason_phrase(status)
    repeated = f"{reason}: "
    if msg.lower().startswith(repeated.lower()):
        msg = msg[len(repeated) :]
    return f"{status} {reason}: {msg}\n".encode()
