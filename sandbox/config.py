"""Settings of the local kie.ai stand-in: timing, fault injection, limits and credits."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from worker.settings import parse_rate_limit

FaultCode = Literal[429, 455, 500]
FaultStyle = Literal["http", "body", "page", "mixed"]
#: ``remix`` and ``remixStatus`` are the legacy remix relay's request and status;
#: ``upload`` is the File Upload API.
Endpoint = Literal["createTask", "recordInfo", "remix", "remixStatus", "upload"]
ALL_ENDPOINTS: tuple[Endpoint, ...] = ("createTask", "recordInfo", "remix", "remixStatus", "upload")
Probability = Annotated[float, Field(ge=0.0, le=1.0)]

DEFAULT_API_KEY = "sk-sandbox"
VALUE_ERROR_PREFIX = "Value error, "
PYDANTIC_KEY_MARK = "[key]"
#: What a header value may hold: tab, printable ASCII and Latin-1 bytes (RFC 9110 obs-text).
HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


class SandboxConfig(BaseModel):
    """Behaviour of the sandbox; every field can be changed while it runs.

    Random faults (``faults``, ``reset_rate``, ``html_rate``, ``slow_rate``, ``cut_rate``,
    ``trickle_rate``) hit only the endpoints named in ``fault_endpoints``; ``drop_rate`` and
    ``gateway_rate``
    hits accepted createTask (and relay remix) requests whatever ``fault_endpoints`` says;
    ``maintenance`` hits createTask, recordInfo, the file upload, the credit endpoint and
    the relay. ``retry_after``, when set, is the ``Retry-After`` header of every 429
    answer, sent verbatim (it overrides ``retry_after_header``).
    """

    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    api_key: str = Field(default=DEFAULT_API_KEY, min_length=1)
    generation_seconds: float = Field(default=3.0, ge=0.0)
    faults: dict[FaultCode, Probability] = Field(default_factory=dict)
    fault_endpoints: list[Endpoint] = Field(default_factory=lambda: list(ALL_ENDPOINTS))
    fault_style: FaultStyle = "http"
    reset_rate: Probability = 0.0
    html_rate: Probability = 0.0
    slow_rate: Probability = 0.0
    slow_seconds: float = Field(default=2.0, ge=0.0)
    cut_rate: Probability = 0.0
    drop_rate: Probability = 0.0
    gateway_rate: Probability = 0.0
    trickle_rate: Probability = 0.0
    trickle_seconds: float = Field(default=1.0, ge=0.0)
    rate_limit: str | None = None
    retry_after_header: bool = True
    retry_after: str | None = None
    credits: int | None = Field(default=None, ge=0)
    maintenance: bool = False
    webhook_hmac_key: str | None = None
    seed: int | None = None
    #: The legacy remix relay: ``sync`` answers with the images after generating them
    #: (``generation_seconds``) inside the request; ``async`` answers with a task id.
    relay_mode: Literal["sync", "async"] = "sync"
    #: The relay's bearer key (None: the same as ``api_key``).
    relay_api_key: str | None = Field(default=None, min_length=1)
    #: The relay's name of each task state, as its status endpoint reports it.
    relay_state_names: dict[str, str] = Field(
        default_factory=lambda: {
            "waiting": "submitted",
            "queuing": "submitted",
            "generating": "processing",
            "success": "succeed",
            "fail": "failed",
        }
    )

    @field_validator("faults", mode="before")
    @classmethod
    def _coerce_fault_codes(cls, value: Any) -> Any:
        """Accept codes written as strings (JSON object keys are always strings)."""
        if isinstance(value, dict):
            return {_as_int(key): prob for key, prob in value.items()}
        return value

    @field_validator("faults")
    @classmethod
    def _check_fault_total(cls, value: dict[int, float]) -> dict[int, float]:
        if sum(value.values()) > 1.0:
            raise ValueError("fault probabilities must add up to at most 1")
        return value

    @field_validator("rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate_limit(value)
        return value

    @field_validator("retry_after")
    @classmethod
    def _check_header_value(cls, value: str | None) -> str | None:
        if value is not None and HEADER_VALUE.fullmatch(value) is None:
            raise ValueError("must be a header value: Latin-1 text without control characters")
        return value

    @property
    def rate_limit_window(self) -> tuple[int, float] | None:
        """``rate_limit`` as ``(requests, window_seconds)``, or None when unlimited."""
        return None if self.rate_limit is None else parse_rate_limit(self.rate_limit)

    def apply(self, patch: dict[str, Any]) -> SandboxConfig:
        """Return a validated copy with the fields in ``patch`` replaced.

        :param patch: field name to new value; unknown names are refused.
        :raises pydantic.ValidationError: when the merged settings are invalid.
        """
        return SandboxConfig.model_validate({**self.model_dump(), **patch})


def _as_int(key: Any) -> Any:
    """``key`` as an int when it is a string of digits, otherwise unchanged."""
    return int(key) if isinstance(key, str) and key.strip().isdigit() else key


def describe_error(error: ValidationError) -> str:
    """One line naming the first invalid setting and why, e.g. ``reset_rate: Input should be...``.

    :param error: what pydantic raised for a config.
    """
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"] if part != PYDANTIC_KEY_MARK)
    reason = first["msg"].removeprefix(VALUE_ERROR_PREFIX)
    return f"{where}: {reason}" if where else reason
