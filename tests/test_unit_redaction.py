"""Secrets in every shape they can take, kept out of texts and log records."""

from __future__ import annotations

import io
import logging

import pytest

from worker.redaction import (
    MIN_FRAGMENT,
    REDACTED,
    RedactingFilter,
    Redactor,
    install_log_redaction,
    redactor_for,
)
from worker.upstreams.errors import excerpt

SECRET = "sk-redact-0123456789abcdefABCDEF"


@pytest.mark.parametrize(
    "text",
    [
        f"Bearer {SECRET}",
        f"header value {SECRET + chr(10)!r}",  # repr-escaped, as InvalidHeader shows it
        f'{{"auth": "{SECRET}\\n"}}',  # JSON-escaped
        f"echo {SECRET[:12]} (cut by a proxy)",  # a fragment
        f"echo ...{SECRET[-10:]}",
    ],
)
def test_every_shape_of_a_secret_is_redacted(text: str) -> None:
    cleaned = Redactor([SECRET, SECRET + "\n"]).redact(text)
    assert REDACTED in cleaned
    for start in range(len(SECRET) - 7):
        assert SECRET[start : start + 8] not in cleaned


def test_redact_then_shorten_leaves_no_prefix() -> None:
    text = "x" * 150 + SECRET + "y" * 50
    shown = excerpt(Redactor([SECRET]).redact(text))
    assert SECRET[:6] not in shown


def test_short_harmless_words_stay() -> None:
    assert Redactor([SECRET]).redact("job 1234 failed: 429") == "job 1234 failed: 429"


def test_a_log_record_and_its_traceback_are_redacted() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("test-redaction")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    install_log_redaction(Redactor([SECRET]), [logger])
    try:
        try:
            raise ValueError(f"request failed with key {SECRET}")
        except ValueError:
            logger.exception("calling upstream with %s", SECRET)
        logger.warning("plain %s line", SECRET[:10])
    finally:
        logger.removeHandler(handler)

    written = stream.getvalue()
    assert "Traceback" in written and "ValueError" in written
    assert SECRET[:8] not in written
    assert written.count(REDACTED) >= 3
    assert any(isinstance(f, RedactingFilter) for f in handler.filters)


def _filtered(msg: str, args: tuple[object, ...]) -> logging.LogRecord:
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, msg, args, None)
    assert RedactingFilter(Redactor([SECRET])).filter(record)
    return record


def test_a_record_without_a_secret_keeps_its_arguments() -> None:
    """uvicorn's access formatter unpacks ``record.args``: they must survive the filter."""
    args = ("127.0.0.1:5000", "GET", "/v1/jobs", "1.1", 200)
    record = _filtered('%s - "%s %s HTTP/%s" %d', args)
    assert record.args == args


def test_a_secret_in_an_argument_is_redacted_keeping_the_arguments_shape() -> None:
    args = ("127.0.0.1:5000", "GET", f"/v1/jobs?token={SECRET}", "1.1", 200)
    record = _filtered('%s - "%s %s HTTP/%s" %d', args)
    assert isinstance(record.args, tuple) and len(record.args) == 5
    assert record.args[4] == 200 and SECRET[:12] not in record.getMessage()
    assert REDACTED in record.getMessage()


@pytest.mark.parametrize("offset", range(MIN_FRAGMENT))
@pytest.mark.parametrize("start", range(4))
def test_a_fragment_is_found_at_every_alignment_of_the_text(offset: int, start: int) -> None:
    secret = "sk-live-0123456789abcdefXYZ"
    fragment = secret[start : start + MIN_FRAGMENT]
    text = "." * offset + fragment + "~" * offset
    assert Redactor([secret]).redact(text) == "." * offset + REDACTED + "~" * offset


def test_the_redactor_of_an_upstreams_secrets_is_made_once() -> None:
    assert redactor_for(("a-secret-value", None)) is redactor_for(("a-secret-value", None))


def test_fields_given_as_extra_are_redacted_whatever_their_name_or_type() -> None:
    record = logging.LogRecord("worker", logging.INFO, __file__, 1, "calling", None, None)
    vars(record).update({"data": {"kwargs": f"key={SECRET}"}, 7: f"{SECRET}\n", "count": 3})
    assert RedactingFilter(Redactor([SECRET])).filter(record)
    assert SECRET[:8] not in str(vars(record))
    assert vars(record)["count"] == 3 and REDACTED in vars(record)[7]
