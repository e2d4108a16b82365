"""Configuration read from the environment (or a ``.env`` file) with pydantic-settings.

Every name here is part of the public contract in the design document. The two
secrets (``KIE_API_KEY``, ``KIE_WEBHOOK_HMAC_KEY``) are ``SecretStr`` so that a
``repr`` of the settings, a log line or a traceback never shows them.
"""

from __future__ import annotations

import re
from functools import lru_cache

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
RATE_LIMIT_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(\d*\.?\d+)?\s*(s|sec|m|min|h)?\s*$")
_UNIT_SECONDS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_rate_limit(text: str) -> tuple[int, float]:
    """Parse ``"20/10s"`` into ``(20, 10.0)``: requests allowed per window of seconds.

    Accepted forms: ``N/S`` plus an optional unit ``s``, ``m`` or ``h``
    (``20/10s``, ``100/1m``, ``5/s``). Raises ``ValueError`` otherwise.
    """
    match = RATE_LIMIT_PATTERN.match(text)
    if not match:
        raise ValueError(f"rate limit {text!r} is not of the form N/Ss (for example 20/10s)")
    count, amount, unit = match.groups()
    window = float(amount or 1) * _UNIT_SECONDS[unit or "s"]
    if int(count) < 1 or window <= 0:
        raise ValueError(f"rate limit {text!r} must allow at least 1 request per positive window")
    return int(count), window


class Settings(BaseSettings):
    """All knobs of the pipeline; see the README's configuration table."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    redis_url: str = DEFAULT_REDIS_URL
    result_backend_url: str | None = None

    kie_api_key: SecretStr | None = None
    kie_base_url: str = "https://api.kie.ai"
    kie_upload_base_url: str = "https://kieai.redpandaai.co"
    kie_callback_url: str | None = None
    kie_webhook_hmac_key: SecretStr | None = None
    kie_rate_limit: str = "20/10s"
    kie_connect_timeout_s: float = Field(5.0, gt=0)
    kie_read_timeout_s: float = Field(20.0, gt=0)

    remix_poll_initial_s: float = Field(2.0, gt=0)
    remix_poll_max_s: float = Field(30.0, gt=0)
    remix_deadline_s: float = Field(900.0, gt=0)
    remix_retry_base_s: float = Field(1.0, gt=0)
    remix_retry_max_s: float = Field(30.0, gt=0)
    remix_max_retries: int = Field(8, ge=0)
    remix_submit_deadline_s: float = Field(86400.0, gt=0)
    remix_pause_probe_s: float = Field(5.0, gt=0)
    remix_job_ttl_s: int = Field(7 * 86400, gt=0)

    ideogram_base_url: str | None = None
    ideogram_api_key: SecretStr | None = None

    @field_validator("kie_rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        parse_rate_limit(value)
        return value

    @model_validator(mode="after")
    def _check_countdowns(self) -> Settings:
        # Every countdown the pipeline schedules must stay well under the broker's
        # visibility timeout (see worker.app), or the message is redelivered.
        for name in ("remix_poll_max_s", "remix_retry_max_s"):
            if getattr(self, name) > MAX_COUNTDOWN_S:
                raise ValueError(f"{name.upper()} must be at most {MAX_COUNTDOWN_S:g} seconds")
        if self.remix_poll_initial_s > self.remix_poll_max_s:
            raise ValueError("REMIX_POLL_INITIAL_S must not exceed REMIX_POLL_MAX_S")
        return self

    @property
    def backend_url(self) -> str:
        """Where job records and Celery results live (defaults to the broker)."""
        return self.result_backend_url or self.redis_url

    @property
    def rate_limit(self) -> tuple[int, float]:
        """``KIE_RATE_LIMIT`` as ``(requests, window_seconds)``."""
        return parse_rate_limit(self.kie_rate_limit)


#: The broker's visibility timeout: a message unacknowledged this long is
#: delivered again. See the comment on the Celery configuration in worker.app.
VISIBILITY_TIMEOUT_S = 90
#: Longest countdown any task may schedule; half the visibility timeout leaves
#: room for a worker that is busy when the countdown ends.
MAX_COUNTDOWN_S = VISIBILITY_TIMEOUT_S / 2


class ConfigurationError(ValueError):
    """A setting from the environment is invalid; ``str()`` is one line."""


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]).upper()
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "invalid configuration: " + "; ".join(parts)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once; raises :class:`ConfigurationError`."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc)) from None
