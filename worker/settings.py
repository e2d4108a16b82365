"""Configuration read from the environment (or a ``.env`` file) with pydantic-settings.

Every name here is part of the public contract (``docs/design.md``). Secrets are
``SecretStr`` so that a ``repr`` of the settings, a log line or a traceback never shows
them. A secret often comes from a file (a Kubernetes or Docker secret) that ends in a
newline: surrounding whitespace is stripped, and a control character *inside* a secret is
refused at start, because it would end up escaped in an HTTP error message. Every secret
may also be given as the path of a file holding it: ``KIE_API_KEY_FILE`` instead of
``KIE_API_KEY`` (and so on, :data:`SECRET_NAMES`), never both. A secret (or its file
variable) that is set but holds nothing is refused at start, never read as unset: an empty
token list would open the HTTP API, an empty HMAC key would turn a signature off.

The knobs are also checked against each other, so that for example a job record cannot
expire while its job may still run. Tenants (each token's, their weights, how many jobs
one may have waiting): docs/tenants.md.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.cpu import default_concurrency
from worker.fields import DEFAULT_TENANT, check_tenant
from worker.redis_urls import (
    SentinelOptions,
    check_master_name,
    is_sentinel_url,
    parse_sentinel_url,
    url_passwords,
)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
RATE_LIMIT_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(\d*\.?\d+)?\s*(s|sec|m|min|h|d)?\s*$")
_UNIT_SECONDS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")

#: A job's lease covers one upstream request plus this much for the Redis work around it.
LEASE_MARGIN_S = 15.0
#: An open createTask attempt is respected this much longer than a lease, for its worker
#: to record an accepted task id through a Redis blip (it keeps trying longer than that).
RECORD_RETRY_S = 30.0
#: An archive step's downloads end this long before the broker's visibility timeout:
#: time for its last write (an S3 PutObject with its retries ends within 50 s) and Redis.
ARCHIVE_STEP_MARGIN_S = 60.0
#: Job records outlive the longest a job can run by at least this much.
TTL_MARGIN_S = 3600
#: The secret settings; each may instead be read from the file ``<NAME>_FILE`` names.
SECRET_NAMES = (
    "kie_api_key",
    "kie_webhook_hmac_key",
    "ideogram_api_key",
    "remix_api_tokens",
    "remix_notify_hmac_key",
    "redis_sentinel_password",
)
#: The Redis URLs, which may hold a password: each may also be read from ``<NAME>_FILE``.
URL_FILE_NAMES = ("redis_url", "result_backend_url")
#: boto3's secret environment variables: redacted like the settings' secrets.
AWS_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
#: The relay's task states (lower case) onto the poll policy's; see ``IDEOGRAM_STATE_MAP``.
DEFAULT_IDEOGRAM_STATE_MAP = "submitted=waiting,processing=generating,succeed=success,failed=fail"
#: The poll policy's states a relay state may be mapped onto.
POLL_STATES = frozenset({"waiting", "queuing", "generating", "success", "fail"})
#: A secret file larger than this is not a secret (a wrong path, a directory dump).
SECRET_FILE_MAX_BYTES = 64 * 1024


def parse_rate_limit(text: str) -> tuple[int, float]:
    """Parse ``"20/10s"`` into ``(20, 10.0)``: requests allowed per window of seconds.

    Accepted forms: ``N/S`` plus an optional unit ``s``, ``m``, ``h`` or ``d``
    (``20/10s``, ``100/1m``, ``500/1d``, ``5/s``). Raises ``ValueError`` otherwise.
    """
    match = RATE_LIMIT_PATTERN.match(text)
    if not match:
        raise ValueError(f"rate limit {text!r} is not of the form N/Ss (for example 20/10s)")
    count, amount, unit = match.groups()
    window = float(amount or 1) * _UNIT_SECONDS[unit or "s"]
    if int(count) < 1 or window <= 0:
        raise ValueError(f"rate limit {text!r} must allow at least 1 request per positive window")
    return int(count), window


def parse_state_map(text: str) -> dict[str, str]:
    """``submitted=waiting,succeed=success`` -> ``{"submitted": "waiting", ...}``.

    Relay states are matched without regard to case; success and fail must be named.
    """
    found: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        relay, sep, ours = (part.strip() for part in entry.partition("="))
        if not sep or not relay or ours not in POLL_STATES:
            raise ValueError(
                f"entry {entry!r} is not relay_state=one of {', '.join(sorted(POLL_STATES))}"
            )
        found[relay.lower()] = ours
    if not {"success", "fail"} <= set(found.values()):
        raise ValueError("must name the relay's states for success and fail")
    return found


def check_redis_url(value: str) -> str:
    """A ``redis://``, ``rediss://`` or ``unix://`` URL with a valid port and database, or a
    ``sentinel://`` one (:func:`worker.redis_urls.parse_sentinel_url`)."""
    if is_sentinel_url(value):
        parse_sentinel_url(value)
        return value.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss://, unix:// or sentinel:// URL")
    try:
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError:
        raise ValueError("has a port out of range") from None
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError("has no host")
    database = parts.path.strip("/")
    if parts.scheme != "unix" and database and not database.isdigit():
        raise ValueError("names a database that is not a number")
    return value


def clean_secret(value: Any) -> Any:
    """Strip surrounding whitespace; refuse an empty value and control characters inside.

    ``None`` (unset) stays ``None``. Messages never echo the value: it is a secret.
    """
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str):
        return value
    value = value.strip()
    if not value:
        raise ValueError("is set but empty; give it a value or unset it")
    if _CONTROL_CHARACTER.search(value):
        raise ValueError("contains a control character (a line break or similar) inside")
    return value


def parse_api_tokens(text: str) -> list[str]:
    """``"svc-a:tok-a, tok-b"`` -> ``["tok-a", "tok-b"]``: the bearer tokens of
    ``REMIX_API_TOKENS`` (see :func:`parse_token_tenants`, which checks them)."""
    return list(parse_token_tenants(text))


def parse_token_tenants(text: str) -> dict[str, str]:
    """``"svc-a:tok-a, tok-b"`` -> ``{"tok-a": "svc-a", "tok-b": "default"}``: each bearer
    token of ``REMIX_API_TOKENS`` and its tenant (a bare token's is ``default``). A tenant's
    entry may hold two tokens while they are rotated: ``svc-a:NEW|OLD``.

    Raises ``ValueError`` with one line naming the entry by its position (1 is the first),
    never a token: on an empty entry (a list that holds no token would turn the API's auth
    off), an entry with an empty tenant or token, a tenant name that is not one
    (:func:`~worker.fields.check_tenant`), two entries naming the same tenant, or the same
    token twice. Bare tokens may be many (today's lists of tokens keep working).
    """
    entries = [entry.strip() for entry in text.split(",")]
    if not any(entries):
        raise ValueError("holds no token, only commas or spaces")
    if not all(entries):
        raise ValueError("has an empty entry (two commas in a row, or one at an end)")
    found: dict[str, str] = {}
    where: dict[str, int] = {}
    named: dict[str, int] = {}
    for position, entry in enumerate(entries, start=1):
        tenant, tokens = _token_entry(position, entry)
        if ":" in entry and tenant in named:
            raise ValueError(f"entries {named[tenant]} and {position} name the same tenant")
        if ":" in entry:
            named[tenant] = position
        for token in tokens:
            if token in where:
                which = (
                    f"entry {position} holds"
                    if where[token] == position
                    else f"entries {where[token]} and {position} hold"
                )
                raise ValueError(f"{which} the same token twice")
            where[token] = position
            found[token] = tenant
    return found


def _token_entry(position: int, entry: str) -> tuple[str, list[str]]:
    """One entry of ``REMIX_API_TOKENS``: ``tenant:token`` (``tenant:new|old``) or a bare
    token; its tenant and tokens."""
    if ":" not in entry:
        return DEFAULT_TENANT, [entry]
    tenant, _, token_text = (part.strip() for part in entry.partition(":"))
    if not tenant:
        raise ValueError(f"entry {position} has nothing before its ':' (tenant:token)")
    tokens = [token.strip() for token in token_text.split("|")]
    if not all(tokens):
        raise ValueError(f"entry {position} has no token after its tenant (tenant:token)")
    try:
        check_tenant(tenant)
    except ValueError:
        # Not quoted: in a list written before tenants existed it may be half a token.
        raise ValueError(
            f"entry {position}: the tenant before ':' must be 1 to 64 letters, digits, "
            "'_', '.' or '-'"
        ) from None
    return tenant, tokens


#: The weights ``REMIX_TENANT_WEIGHTS`` may give: at most 10,000 to 1 between tenants.
TENANT_WEIGHT_RANGE = (0.01, 100.0)


def parse_tenant_weights(text: str | None) -> dict[str, float]:
    """``"svc-a=3,svc-b=1"`` -> ``{"svc-a": 3.0, "svc-b": 1.0}`` (``REMIX_TENANT_WEIGHTS``).

    Blank or ``None``: no weights (every tenant weighs 1). Raises ``ValueError`` with one
    line for an entry that is not ``tenant=weight``, a bad tenant name, a weight outside
    :data:`TENANT_WEIGHT_RANGE` (a tiny one would lift its class's shared pass beyond what
    a float can add 1 to, ending equal turns), or a tenant named twice.
    """
    if text is None or not text.strip():
        return {}
    weights: dict[str, float] = {}
    for position, entry in enumerate((e.strip() for e in text.split(",")), start=1):
        name, sep, raw = (part.strip() for part in entry.partition("="))
        if not sep or not name or not raw:
            raise ValueError(f"entry {position} {entry[:40]!r} is not tenant=weight")
        try:
            tenant = check_tenant(name)
        except ValueError as exc:
            raise ValueError(f"entry {position}: {exc}") from None
        try:
            weight = float(raw)
        except ValueError:
            weight = math.nan
        low, high = TENANT_WEIGHT_RANGE
        if not math.isfinite(weight) or not low <= weight <= high:
            raise ValueError(
                f"tenant {tenant}: the weight must be a number from {low:g} to {high:g}, "
                f"not {raw[:20]!r}"
            )
        if tenant in weights:
            raise ValueError(f"tenant {tenant} is named twice")
        weights[tenant] = weight
    return weights


def check_secret(name: str, value: Any) -> Any:
    """The secret setting ``name`` cleaned (:func:`clean_secret`) and, for a list, parsed."""
    value = clean_secret(value)
    if name == "remix_api_tokens" and value is not None:
        parse_api_tokens(value)
    return value


def read_secret_file(name: str, path: str) -> str:
    """The content of the secret file ``path`` given as ``<NAME>_FILE``.

    Raises ``ValueError`` with one line naming the variable and the path (never the
    content) when the file cannot be read, is too large or is not text.
    """
    variable = f"{name.upper()}_FILE"
    try:
        with open(path, "rb") as secret_file:
            raw = secret_file.read(SECRET_FILE_MAX_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueError(f"{variable}: cannot read {path!r}: {reason}") from None
    if len(raw) > SECRET_FILE_MAX_BYTES:
        raise ValueError(f"{variable}: {path!r} is larger than {SECRET_FILE_MAX_BYTES} bytes")
    try:
        # utf-8-sig: an editor's byte-order mark is not part of the secret.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{variable}: {path!r} is not UTF-8 text") from None
    if not text.strip():
        # Naming a file is asking for the secret: an empty one must not turn it off.
        raise ValueError(f"{variable}: {path!r} is empty")
    return text


def _secret_from_file(name: str, path: str) -> Any:
    """The secret ``name`` read from ``path`` and checked; errors name ``<NAME>_FILE``."""
    text = read_secret_file(name, path)
    try:
        return check_secret(name, text)
    except ValueError as exc:
        raise ValueError(f"{name.upper()}_FILE: {path!r} {exc}") from None


def _blank(value: Any) -> bool:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    return value is None or (isinstance(value, str) and not value.strip())


def _file_variable(data: dict[str, Any], name: str) -> str | None:
    """The path ``<NAME>_FILE`` gives (None when unset); refused when blank or when
    ``<NAME>`` is set too."""
    path = data.get(f"{name}_file")
    if path is None:
        return None
    if _blank(path):
        raise ValueError(f"{name.upper()}_FILE is set but empty; name a file or unset it")
    if data.get(name) is not None:
        raise ValueError(f"{name.upper()} and {name.upper()}_FILE are both set; set only one")
    return str(path).strip()


def check_archive_url(value: str) -> str:
    """``file:///absolute/dir`` or ``s3://bucket[/prefix]``; raises ``ValueError`` otherwise.

    A control character (NUL included), written or %-encoded, is refused: no path or key
    can hold it, so every write would fail.
    """
    parts = urlsplit(value)
    if _CONTROL_CHARACTER.search(value) or _CONTROL_CHARACTER.search(unquote(parts.path)):
        raise ValueError("a store URL must not hold a control character (such as %00)")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError("a file:// URL must name an absolute directory (file:///dir)")
        if parts.query or parts.fragment:
            raise ValueError("a file:// URL takes no ?query or #fragment")
        return value
    if parts.scheme == "s3":
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", parts.netloc):
            raise ValueError("an s3:// URL must name a valid bucket (s3://bucket/prefix)")
        if parts.query or parts.fragment:
            raise ValueError("an s3:// URL takes no ?query or #fragment")
        return value
    raise ValueError("must be file:///absolute/dir or s3://bucket/prefix")


def check_callback_url(value: str) -> str:
    """An https URL, or plain http to a loopback host; raises ``ValueError`` otherwise.

    The upstream signs a callback's task id and timestamp, not its body: whoever reads a
    signature on the way may send it first with a body of their own.
    """
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
        raise ValueError("must be an http(s) URL without a #fragment")
    # Parsers disagree on such URLs (``http://a.example\@localhost/``: urlsplit reads
    # localhost, urllib3 and browsers a.example), so the host checked may not be the one
    # the upstream calls.
    if parts.username is not None or "\\" in value or not value.isprintable() or " " in value:
        raise ValueError("must not hold a user name, a backslash or white space")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError(
            "must be an https URL (plain http only to a loopback host: 127.0.0.0/8, ::1, localhost)"
        )
    return value


def is_loopback_host(host: str) -> bool:
    """``localhost``, an address in 127.0.0.0/8, or ``::1`` (written out, not resolved)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_spend_cap(text: str | None) -> list[tuple[int, float]]:
    """Parse ``"500/1d,60/1h"`` into ``[(500, 86400.0), (60, 3600.0)]``.

    Each comma-separated part is a rate (see :func:`parse_rate_limit`): accepted createTasks
    allowed per window. Blank or ``None`` means no cap (an empty list). Two parts with the
    same window are refused: one of them would be meaningless, probably a typo.
    """
    if text is None or not text.strip():
        return []
    caps = [parse_rate_limit(part) for part in text.split(",")]
    windows = [window for _, window in caps]
    if len(set(windows)) != len(windows):
        raise ValueError(f"spend cap {text!r} names the same window twice")
    return caps


class Settings(BaseSettings):
    """All knobs of the pipeline; see the README's configuration table."""

    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", case_sensitive=False, hide_input_in_errors=True
    )

    redis_url: str = DEFAULT_REDIS_URL
    result_backend_url: str | None = None
    #: With a ``sentinel://`` URL: the primary's name in Sentinel, and the sentinels' own
    #: password (their ``requirepass``; the primary's is in the URL).
    redis_sentinel_master: str = "mymaster"
    redis_sentinel_password: SecretStr | None = None
    #: After recording an accepted upstream task, wait this long at most for a Redis
    #: replica to have it (``WAIT``), so that a failover right after cannot lose it; 0: off.
    remix_accept_wait_ms: int = Field(0, ge=0, le=10000)

    kie_api_key: SecretStr | None = None
    kie_base_url: str = "https://api.kie.ai"
    kie_upload_base_url: str = "https://kieai.redpandaai.co"
    #: Where producers keep source images given as files: unset, the job store's Redis;
    #: ``file:///dir``, a directory producers and workers share; ``s3://bucket/prefix``.
    remix_blob_url: str | None = None
    #: Most bytes the blobs in Redis may hold together (a producer is refused beyond).
    remix_blob_max_bytes: int = Field(256 * 1024 * 1024, gt=0)
    kie_callback_url: str | None = None
    kie_webhook_hmac_key: SecretStr | None = None
    kie_rate_limit: str = "20/10s"
    #: Accepted createTasks allowed per API key, fleet-wide, in one or more windows
    #: (``500/1d,60/1h``); unset: no cap.
    remix_spend_cap: str | None = None
    kie_connect_timeout_s: float = Field(5.0, gt=0)
    kie_read_timeout_s: float = Field(20.0, gt=0)
    kie_request_deadline_s: float = Field(30.0, gt=0)

    remix_poll_initial_s: float = Field(2.0, gt=0)
    remix_poll_max_s: float = Field(30.0, gt=0)
    remix_deadline_s: float = Field(900.0, gt=0)
    remix_retry_base_s: float = Field(1.0, gt=0)
    remix_retry_max_s: float = Field(30.0, gt=0)
    remix_max_retries: int = Field(8, ge=0)
    remix_submit_deadline_s: float = Field(86400.0, gt=0)
    remix_pause_probe_s: float = Field(5.0, gt=0)
    remix_job_ttl_s: int = Field(7 * 86400, gt=0)

    #: With KIE_CALLBACK_URL set, the first (safety-net) poll comes this long after accept.
    remix_callback_poll_s: float = Field(60.0, gt=0)
    #: With callbacks on, how long a job whose createTask outcome is unknown waits for a
    #: callback naming it before it is sent again.
    remix_callback_wait_s: float = Field(300.0, ge=0)
    #: Callbacks whose timestamp is further than this from now are refused (replays).
    kie_callback_window_s: int = Field(300, gt=0)
    #: Largest callback body accepted, in bytes.
    kie_callback_max_bytes: int = Field(256 * 1024, gt=0)
    #: A verified callback finishes its job from one recordInfo answer, not from its body
    #: (which the signature does not cover): 2 upstream requests per job instead of 1.
    kie_callback_confirm: bool = False

    #: Bearer tokens that may use the HTTP API, each naming its tenant (``svc-a:TOKEN``,
    #: comma-separated; a bare token is the ``default`` tenant's); unset: no auth. Set, it
    #: must hold at least one token and no empty entry.
    remix_api_tokens: SecretStr | None = None
    #: Share of a key's send budget between tenants waiting in the same priority class
    #: (``svc-a=3,svc-b=1``); a tenant not named weighs 1.
    remix_tenant_weights: str | None = None
    #: The most jobs not yet sent (``queued``) one tenant may have; unset: no limit.
    remix_tenant_max_waiting: int | None = Field(None, ge=1)
    #: Signs completion webhooks (``notify_url``); unset: they are sent unsigned.
    remix_notify_hmac_key: SecretStr | None = None
    #: Allow completion webhooks to private and loopback addresses (tests, internal nets);
    #: off: public addresses only (:mod:`worker.net.outbound`).
    remix_notify_allow_private: bool = False
    #: Log one JSON object per line (for a log pipeline); off: readable text lines.
    remix_log_json: bool = False
    #: Task events for Flower (sent, received, started, done); off: Flower switches a
    #: worker's on by itself within 5 s, and shows a queued job only once it is taken.
    remix_task_events: bool = True
    #: How many times a completion webhook is tried before it is given up.
    remix_notify_max_attempts: int = Field(10, ge=1)
    #: Total time one webhook delivery may take, connecting included.
    remix_notify_timeout_s: float = Field(10.0, gt=0, le=60)
    #: Base and longest delay of the backoff (full jitter) between webhook deliveries.
    remix_notify_retry_base_s: float = Field(5.0, gt=0)
    remix_notify_retry_max_s: float = Field(3600.0, gt=0)
    #: Where finished jobs' result images are archived: ``file:///abs/dir`` or
    #: ``s3://bucket/prefix``; unset: archiving is off.
    remix_archive_url: str | None = None
    #: Endpoint of an S3-compatible store (MinIO, moto ...); unset: AWS itself. Credentials
    #: come from boto3's usual chain (environment, shared files, instance role).
    remix_archive_s3_endpoint_url: str | None = None
    #: Allow archive downloads from private and loopback addresses (development and tests:
    #: the sandbox's result URLs are on 127.0.0.1); off: public addresses only.
    remix_archive_allow_private: bool = False
    #: Largest result image archived; a bigger one is not read past this many bytes.
    remix_archive_max_bytes: int = Field(50 * 1000 * 1000, gt=0)
    #: Total time one image download may take, connecting included. All downloads of one
    #: archive step share REMIX_BROKER_VISIBILITY_TIMEOUT_S - 60 s (see ``archive_step_s``).
    remix_archive_timeout_s: float = Field(60.0, gt=0)
    #: How many times a job's archiving is tried before it is given up (and reported).
    remix_archive_max_attempts: int = Field(8, ge=1)
    #: Base and longest delay of the backoff (full jitter) between archiving tries.
    remix_archive_retry_base_s: float = Field(10.0, gt=0)
    remix_archive_retry_max_s: float = Field(1800.0, gt=0)

    #: The broker's visibility timeout: a message unacknowledged this long (its worker
    #: died, or its task is still running) is delivered again, so no task may run longer.
    remix_broker_visibility_timeout_s: float = Field(120.0, gt=0)
    #: Pool slots (prefork children) of a worker started without ``-c``; unset: the
    #: container's CPU quota, rounded up, else the CPUs (``worker_concurrency``).
    remix_worker_concurrency: int | None = Field(None, ge=1)

    ideogram_base_url: str | None = None
    ideogram_api_key: SecretStr | None = None
    #: The relay's status endpoint (an assumption: the relay documents none).
    ideogram_status_path: str = "/ideogram/remix/{task_id}"
    #: The relay's task states onto the poll's (``relay=waiting|queuing|generating|success|fail``).
    ideogram_state_map: str = DEFAULT_IDEOGRAM_STATE_MAP
    ideogram_rate_limit: str = "20/10s"
    ideogram_connect_timeout_s: float = Field(5.0, gt=0)
    #: The relay may generate inside the request: its read timeout is long. The total
    #: deadline, plus a margin, must end before the broker's visibility timeout.
    ideogram_read_timeout_s: float = Field(90.0, gt=0)
    ideogram_request_deadline_s: float = Field(100.0, gt=0)

    #: Paths of files holding the secrets above (Kubernetes or Docker secrets); a secret
    #: may come from its variable or from its file, not both.
    kie_api_key_file: str | None = None
    kie_webhook_hmac_key_file: str | None = None
    ideogram_api_key_file: str | None = None
    remix_api_tokens_file: str | None = None
    remix_notify_hmac_key_file: str | None = None
    redis_sentinel_password_file: str | None = None
    #: Paths of files holding ``REDIS_URL`` or ``RESULT_BACKEND_URL`` (with a password).
    redis_url_file: str | None = None
    result_backend_url_file: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        """Replace each ``<NAME>_FILE`` by the content of the file it names."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in SECRET_NAMES:
            path = _file_variable(data, name)
            if path is not None:
                data[name] = _secret_from_file(name, path)
        for name in URL_FILE_NAMES:
            path = _file_variable(data, name)
            if path is not None:
                data[name] = read_secret_file(name, path).strip()
        return data

    @field_validator(
        "kie_api_key",
        "kie_webhook_hmac_key",
        "ideogram_api_key",
        "remix_api_tokens",
        "remix_notify_hmac_key",
        "redis_sentinel_password",
        mode="before",
    )
    @classmethod
    def _clean_secret(cls, value: Any, info: ValidationInfo) -> Any:
        return check_secret(str(info.field_name), value)

    @field_validator("kie_api_key", "ideogram_api_key")
    @classmethod
    def _check_header_safe(cls, value: SecretStr | None) -> SecretStr | None:
        # The key goes into an HTTP header: a character outside ASCII (a pasted byte-order
        # mark, a typographic quote) would fail every request, after its attempt opened.
        if value is not None and not value.get_secret_value().isascii():
            raise ValueError("contains a character outside ASCII (never valid in an API key)")
        return value

    @field_validator("redis_url", "result_backend_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        return None if value is None else check_redis_url(value)

    @field_validator("redis_sentinel_master")
    @classmethod
    def _check_master_name(cls, value: str) -> str:
        return check_master_name(value)

    @field_validator("kie_callback_url")
    @classmethod
    def _check_callback_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return check_callback_url(value.strip())

    @field_validator("remix_archive_url", "remix_blob_url")
    @classmethod
    def _check_store_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return check_archive_url(value.strip())

    @field_validator("remix_archive_s3_endpoint_url", "ideogram_base_url")
    @classmethod
    def _check_http_base_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL")
        return value.strip()

    @field_validator("ideogram_status_path")
    @classmethod
    def _check_status_path(cls, value: str) -> str:
        if not value.startswith("/") or "{task_id}" not in value:
            raise ValueError("must be a path starting with / and holding {task_id}")
        return value

    @field_validator("ideogram_state_map")
    @classmethod
    def _check_state_map(cls, value: str) -> str:
        parse_state_map(value)
        return value

    @field_validator("kie_rate_limit", "ideogram_rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        parse_rate_limit(value)
        return value

    @field_validator("remix_spend_cap")
    @classmethod
    def _check_spend_cap(cls, value: str | None) -> str | None:
        return value if parse_spend_cap(value) else None

    @field_validator("remix_tenant_weights")
    @classmethod
    def _check_tenant_weights(cls, value: str | None) -> str | None:
        return value if parse_tenant_weights(value) else None

    @model_validator(mode="after")
    def _check_together(self) -> Settings:
        if self.remix_poll_initial_s > self.remix_poll_max_s:
            raise ValueError("REMIX_POLL_INITIAL_S must not exceed REMIX_POLL_MAX_S")
        if self.remix_notify_retry_base_s > self.remix_notify_retry_max_s:
            raise ValueError("REMIX_NOTIFY_RETRY_BASE_S must not exceed REMIX_NOTIFY_RETRY_MAX_S")
        if self.remix_archive_retry_base_s > self.remix_archive_retry_max_s:
            raise ValueError("REMIX_ARCHIVE_RETRY_BASE_S must not exceed REMIX_ARCHIVE_RETRY_MAX_S")
        if self.remix_archive_timeout_s > self.archive_step_s:
            raise ValueError(
                "REMIX_ARCHIVE_TIMEOUT_S must be at most REMIX_BROKER_VISIBILITY_TIMEOUT_S - "
                f"{ARCHIVE_STEP_MARGIN_S:.0f} s ({self.archive_step_s:g} s), so that an archive "
                "step ends before the broker delivers its message again"
            )
        if self.kie_request_deadline_s >= self.remix_deadline_s:
            raise ValueError("KIE_REQUEST_DEADLINE_S must be shorter than REMIX_DEADLINE_S")
        if self.ideogram_base_url and self.ideogram_request_deadline_s >= self.remix_deadline_s:
            raise ValueError("IDEOGRAM_REQUEST_DEADLINE_S must be shorter than REMIX_DEADLINE_S")
        if self.lease_s >= self.remix_broker_visibility_timeout_s:
            # The broker would hand a step's message to a second worker while the first
            # still waits for its upstream answer.
            raise ValueError(
                f"the longest upstream request (KIE_REQUEST_DEADLINE_S, or "
                f"IDEOGRAM_REQUEST_DEADLINE_S with the relay) plus {LEASE_MARGIN_S:.0f} s must "
                f"be shorter than REMIX_BROKER_VISIBILITY_TIMEOUT_S "
                f"({self.remix_broker_visibility_timeout_s:g} s)"
            )
        longest_job = self.remix_submit_deadline_s + self.attempt_settle_s + self.remix_deadline_s
        if self.remix_job_ttl_s < longest_job + TTL_MARGIN_S:
            raise ValueError(
                f"REMIX_JOB_TTL_S must be at least {longest_job + TTL_MARGIN_S:.0f} s "
                "(REMIX_SUBMIT_DEADLINE_S + REMIX_DEADLINE_S + one hour), so that no record "
                "expires while its job may still run"
            )
        return self

    @property
    def callbacks_enabled(self) -> bool:
        """Whether createTask asks the upstream to call back (``KIE_CALLBACK_URL`` is set)."""
        return self.kie_callback_url is not None

    @property
    def callback_wait_s(self) -> float:
        """How long an unknown createTask outcome waits for a callback (0: callbacks off)."""
        return self.remix_callback_wait_s if self.callbacks_enabled else 0.0

    def callback_url_for(self, job_id: str) -> str | None:
        """``KIE_CALLBACK_URL`` with the job id added as the ``job_id`` query parameter."""
        if self.kie_callback_url is None:
            return None
        parts = urlsplit(self.kie_callback_url)
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "job_id"]
        query.append(("job_id", job_id))
        return urlunsplit(parts._replace(query=urlencode(query)))

    def api_tokens(self) -> list[str]:
        """The bearer tokens of ``REMIX_API_TOKENS`` (empty only when it is unset: then the
        HTTP API needs none)."""
        return list(self.api_token_tenants())

    def api_token_tenants(self) -> dict[str, str]:
        """Each bearer token of ``REMIX_API_TOKENS`` and the tenant it belongs to (empty
        only when it is unset: then every caller is the ``default`` tenant)."""
        if self.remix_api_tokens is None:
            return {}
        return parse_token_tenants(self.remix_api_tokens.get_secret_value())

    @property
    def tenant_weights(self) -> dict[str, float]:
        """``REMIX_TENANT_WEIGHTS``: the tenants named and their weights."""
        return parse_tenant_weights(self.remix_tenant_weights)

    def tenant_weight(self, tenant: str) -> float:
        """A tenant's weight in its priority class (1 when ``REMIX_TENANT_WEIGHTS`` does not
        name it)."""
        return self.tenant_weights.get(tenant, 1.0)

    @property
    def archive_enabled(self) -> bool:
        """Whether finished jobs' result images are archived (``REMIX_ARCHIVE_URL`` is set)."""
        return self.remix_archive_url is not None

    @property
    def backend_url(self) -> str:
        """Where job records and Celery results live (defaults to the broker)."""
        return self.result_backend_url or self.redis_url

    @property
    def sentinel(self) -> SentinelOptions:
        """What a ``sentinel://`` URL leaves to the settings (see :mod:`worker.redis_urls`)."""
        password = self.redis_sentinel_password
        return SentinelOptions(
            self.redis_sentinel_master, None if password is None else password.get_secret_value()
        )

    @property
    def rate_limit(self) -> tuple[int, float]:
        """``KIE_RATE_LIMIT`` as ``(requests, window_seconds)``."""
        return parse_rate_limit(self.kie_rate_limit)

    @property
    def spend_caps(self) -> list[tuple[int, float]]:
        """``REMIX_SPEND_CAP`` as ``[(accepted createTasks, window_seconds), ...]``."""
        return parse_spend_cap(self.remix_spend_cap)

    @property
    def worker_concurrency(self) -> int:
        """``REMIX_WORKER_CONCURRENCY``, or the CPUs this process may use (its cgroup's
        quota rounded up, else the CPU count; at least 1)."""
        return self.remix_worker_concurrency or default_concurrency()

    @property
    def lease_s(self) -> float:
        """How long a dispatched job step may take before the schedule sends it again.

        A step makes at most one upstream request (``KIE_REQUEST_DEADLINE_S``, or
        ``IDEOGRAM_REQUEST_DEADLINE_S`` when the relay is configured) plus a few Redis
        calls. It is also how soon a SIGKILLed worker's jobs move again.
        """
        return self.longest_request_s + LEASE_MARGIN_S

    @property
    def archive_step_s(self) -> float:
        """How long the downloads of one archive step may take, all images together.

        A step must end before the broker's visibility timeout: past it, the broker hands
        the same message (the same archive token) to another slot while the first still
        runs. So the step's downloads share this budget and its last write gets
        :data:`ARCHIVE_STEP_MARGIN_S`.
        """
        return self.remix_broker_visibility_timeout_s - ARCHIVE_STEP_MARGIN_S

    @property
    def ideogram_configured(self) -> bool:
        """Whether this process may send jobs to the relay (its URL and key are set)."""
        return self.ideogram_base_url is not None and self.ideogram_api_key is not None

    @property
    def longest_request_s(self) -> float:
        """The total deadline of the longest upstream request this process may make."""
        if self.ideogram_base_url is None:
            return self.kie_request_deadline_s
        return max(self.kie_request_deadline_s, self.ideogram_request_deadline_s)

    @property
    def attempt_settle_s(self) -> float:
        """How long an open createTask attempt may still record its outcome.

        Until then no other worker sends createTask for the job; after it the attempt's
        outcome counts as unknown and a new attempt may go (and may pay twice).
        """
        return self.lease_s + RECORD_RETRY_S

    @property
    def record_lifetime_s(self) -> float:
        """Longest a job's record can live after the job was created: its longest run plus
        the record's time to live (the state indexes forget jobs older than this)."""
        longest_job = self.remix_submit_deadline_s + self.attempt_settle_s + self.remix_deadline_s
        return longest_job + self.remix_job_ttl_s

    def secrets(self) -> list[str]:
        """The values of every secret setting that is set, Redis passwords included."""
        found = (
            self.kie_api_key,
            self.kie_webhook_hmac_key,
            self.ideogram_api_key,
            self.remix_notify_hmac_key,
            self.redis_sentinel_password,
        )
        values = [secret.get_secret_value() for secret in found if secret is not None]
        values += self.api_tokens()
        # The archive's S3 credentials are boto3's, not settings, but just as secret.
        values += [os.environ[name] for name in AWS_SECRET_VARIABLES if os.environ.get(name)]
        for url in (self.redis_url, self.backend_url):
            values += url_passwords(url)
        return values


class ConfigurationError(ValueError):
    """A setting from the environment is invalid; ``str()`` is one line and shows no secret."""


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]).upper()
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "invalid configuration: " + " ".join("; ".join(parts).split())


_overrides: dict[str, Any] = {}


def load_settings(**overrides: Any) -> Settings:
    """Read the settings now; raises :class:`ConfigurationError` with one line."""
    try:
        return Settings(**{**_overrides, **overrides})
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once; raises :class:`ConfigurationError`."""
    return load_settings()


def set_overrides(**overrides: Any) -> None:
    """Replace the values that win over the environment (see ``worker.app.configure``)."""
    _overrides.clear()
    _overrides.update(overrides)
    get_settings.cache_clear()
