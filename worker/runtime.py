"""The collaborators of the pipeline, built once per process: :class:`Services`.

The policies (:mod:`worker.submit_policy`, :mod:`worker.poll_policy`) take a
:class:`Services` as their argument, so each path can be tested against a real Redis (and
the sandbox) without starting a worker.
Here they are built from the settings, lazily and again after a fork (no socket is
shared across a fork). Redis clients are thread-safe; the upstream client keeps one HTTP
session per thread (per greenlet under ``-P gevent``).

Redis clients have socket timeouts and retry a failed command with a short backoff: a
worker rides out a Redis blip of :data:`WORKER_REDIS_RETRY_S` inside the task, so its jobs
move on as soon as Redis is back; a producer (the CLI, a web app) gives up after
:data:`PRODUCER_REDIS_RETRY_S` with a clear error instead of hanging.

:func:`configure` is the one way tests, the demo and the benchmark point a process at
other settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import redis
from celery import states
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from worker import keys
from worker.blobs import BlobStore, blob_store_for
from worker.clock import RedisClock
from worker.errors import JobFailed
from worker.ideogram import IdeogramClient
from worker.jobstore import JobStore, decode_text
from worker.kie import KieClient
from worker.kie_upload import KieUploadClient
from worker.models import PROVIDER, PROVIDERS, JobRecord, JobState
from worker.pause import FleetPause
from worker.publisher import Publisher
from worker.ratelimit import SharedRateLimiter
from worker.redaction import Redactor
from worker.settings import (
    Settings,
    get_settings,
    parse_rate_limit,
    parse_spend_cap,
    parse_state_map,
    set_overrides,
)
from worker.spendcap import SpendCap

#: How long a worker's Redis commands keep retrying through an outage.
WORKER_REDIS_RETRY_S = 15.0
#: How long a producer's Redis commands keep retrying before the caller hears of it.
PRODUCER_REDIS_RETRY_S = 2.0
REDIS_SOCKET_TIMEOUT_S = 10.0
REDIS_CONNECT_TIMEOUT_S = 2.0
REDIS_HEALTH_CHECK_S = 30
_BACKOFF_CAP_S = 1.0
_BACKOFF_BASE_S = 0.05

_role = {"worker": False}


def set_worker_role() -> None:
    """This process is a worker: Redis commands ride out longer outages."""
    _role["worker"] = True
    _reset()


def _retries_for(budget_s: float) -> int:
    """How many retries of the backoff add up to about ``budget_s`` seconds of waiting."""
    total, count = 0.0, 0
    while total < budget_s:
        total += min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2**count)
        count += 1
    return count


def redis_client(url: str, retry_s: float | None = None) -> redis.Redis:
    """A client with timeouts, retrying a failed command for about ``retry_s`` seconds.

    By default as long as this process's role calls for (worker or producer).
    """
    budget = retry_s
    if budget is None:
        budget = WORKER_REDIS_RETRY_S if _role["worker"] else PRODUCER_REDIS_RETRY_S
    return redis.Redis.from_url(
        url,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        health_check_interval=REDIS_HEALTH_CHECK_S,
        retry=Retry(
            ExponentialBackoff(cap=_BACKOFF_CAP_S, base=_BACKOFF_BASE_S), _retries_for(budget)
        ),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def api_key_id(settings: Settings) -> str:
    """A short, non-secret name for the configured API key (shared state is per key)."""
    key = settings.kie_api_key
    raw = key.get_secret_value() if key else ""
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


IDEOGRAM_PROVIDER = PROVIDERS[1]


def ideogram_key_id(settings: Settings) -> str:
    """The relay key's name: its own, so the relay's limit and pause never touch kie.ai's."""
    key = settings.ideogram_api_key
    raw = key.get_secret_value() if key else ""
    return hashlib.sha256(f"{IDEOGRAM_PROVIDER}:{raw}".encode()).hexdigest()[:12]


class ProviderNotConfigured(Exception):
    """A job names a provider this process has no URL or key for; ``str()`` is one line."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        needs = "KIE_API_KEY" if provider == PROVIDER else "IDEOGRAM_BASE_URL and IDEOGRAM_API_KEY"
        super().__init__(f"provider {provider} is not configured on this worker (set {needs})")


@dataclass(frozen=True)
class ProviderParts:
    """The per-key state of one upstream: its rate limit, pause and spend cap."""

    api_key_id: str
    rate_limit: str
    limiter: SharedRateLimiter
    pause: FleetPause
    spend: SpendCap


def configured_providers(settings: Settings) -> list[str]:
    """The providers this process has settings for, kie.ai first."""
    found = [PROVIDER] if settings.kie_api_key is not None else []
    return found + ([IDEOGRAM_PROVIDER] if settings.ideogram_configured else [])


#: Bucket bounds (seconds) of the upstream request latency histograms.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Bucket bounds (seconds) of the end-to-end job time histogram.
JOB_TIME_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 3600.0)
HISTOGRAMS = {
    "create_task_seconds": LATENCY_BUCKETS,
    "record_info_seconds": LATENCY_BUCKETS,
    "job_seconds": JOB_TIME_BUCKETS,
}


class Metrics:
    """Counters and histograms in the broker's Redis, shared by every process of the fleet.

    Workers count here and the HTTP app exports the totals at scrape time, so prefork
    worker processes need no Prometheus multiprocess mode. A counter name may carry one
    label after a colon (``create_task_total:429``). Counting is best effort: a Redis
    error while counting never costs a job.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def incr(self, name: str, amount: int = 1) -> None:
        self.redis.hincrby(keys.METRICS, name, amount)

    def count(self, name: str, amount: int = 1) -> None:
        """Like :meth:`incr`, but a Redis error is swallowed (for hot paths)."""
        with contextlib.suppress(redis.RedisError):
            self.incr(name, amount)

    def observe(self, name: str, seconds: float) -> None:
        """Add one observation to histogram ``name`` (one of :data:`HISTOGRAMS`)."""
        bounds = HISTOGRAMS[name]
        bucket = next((repr(b) for b in bounds if seconds <= b), "+Inf")
        with contextlib.suppress(redis.RedisError):
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(keys.histogram(name), bucket, 1)
            pipe.hincrbyfloat(keys.histogram(name), "sum", max(0.0, seconds))
            pipe.hincrby(keys.histogram(name), "count", 1)
            pipe.execute()

    def read(self) -> dict[str, int]:
        return {decode_text(k): int(v) for k, v in self.redis.hgetall(keys.METRICS).items()}

    def read_histogram(self, name: str) -> tuple[list[tuple[str, int]], float, int]:
        """``([(bound, cumulative count), ..., ("+Inf", total)], sum, count)``."""
        stored = self.redis.hgetall(keys.histogram(name))
        raw = {decode_text(k): decode_text(v) for k, v in stored.items()}
        cumulative, buckets = 0, []
        for bound in [*map(repr, HISTOGRAMS[name]), "+Inf"]:
            cumulative += int(raw.get(bound, 0))
            buckets.append((bound, cumulative))
        return buckets, float(raw.get("sum", 0.0)), int(raw.get("count", 0))


class CeleryResults:
    """Stores a finished job's outcome as its Celery result (its task id is the job id)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def store(self, record: JobRecord) -> None:
        if record.state is JobState.SUCCEEDED:
            self.app.backend.store_result(
                record.job_id, record.model_dump(mode="json"), states.SUCCESS
            )
            return
        failure = JobFailed(record.fail_code or record.state.value, record.fail_msg or "")
        self.app.backend.store_result(record.job_id, failure, states.FAILURE)


@dataclass
class Services:
    """Everything a policy talks to; see the module docstring."""

    settings: Settings
    store: JobStore
    clock: RedisClock
    limiter: SharedRateLimiter
    spend: SpendCap
    pause: FleetPause
    publisher: Publisher
    metrics: Metrics
    results: CeleryResults
    api_key_id: str
    broker: redis.Redis
    redactor: Redactor
    blobs: BlobStore
    #: The upstream the per-key parts above belong to (see :meth:`for_provider`).
    provider: str = PROVIDER
    providers: dict[str, ProviderParts] = field(default_factory=dict, repr=False)
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def client(self) -> KieClient:
        """This thread's upstream client (one HTTP session per thread or greenlet)."""
        client: KieClient | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = new_kie_client(self.settings)
        return client

    def relay_client(self) -> IdeogramClient:
        """This thread's client of the legacy remix relay."""
        client: IdeogramClient | None = getattr(self._local, "relay_client", None)
        if client is None:
            client = self._local.relay_client = new_ideogram_client(self.settings)
        return client

    def status_client(self) -> KieClient | IdeogramClient:
        """The client that asks for a task's state at this provider's upstream."""
        return self.relay_client() if self.provider == IDEOGRAM_PROVIDER else self.client()

    def for_provider(self, name: str) -> Services:
        """These services with the rate limit, pause, spend cap and key of ``name``.

        Raises :class:`ProviderNotConfigured` when this process has no settings for it.
        """
        if name not in configured_providers(self.settings):
            raise ProviderNotConfigured(name)
        if name == self.provider:
            return self
        parts = self.providers[name]
        return dataclasses.replace(
            self,
            provider=name,
            api_key_id=parts.api_key_id,
            limiter=parts.limiter,
            pause=parts.pause,
            spend=parts.spend,
        )

    def uploader(self) -> KieUploadClient:
        """This thread's File Upload client (source images given as files)."""
        client: KieUploadClient | None = getattr(self._local, "uploader", None)
        if client is None:
            client = self._local.uploader = new_upload_client(self.settings)
        return client


T = TypeVar("T")


class PerClient(Generic[T]):
    """One ``T`` per Redis client, built on first use: a store that registers its Lua
    scripts is built once per client, not once per step."""

    #: Clients remembered at most (tests build many); past it the cache starts again.
    MOST_CACHED = 16

    def __init__(self, factory: Callable[[redis.Redis], T]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._built: dict[int, tuple[redis.Redis, T]] = {}

    def get(self, client: redis.Redis) -> T:
        found = self._built.get(id(client))
        if found is not None and found[0] is client:
            return found[1]
        with self._lock:
            if len(self._built) >= self.MOST_CACHED:
                self._built.clear()
            built = self._factory(client)
            self._built[id(client)] = (client, built)
            return built


def new_kie_client(settings: Settings) -> KieClient:
    return KieClient(settings.kie_base_url, **_kie_client_options(settings))


def new_upload_client(settings: Settings) -> KieUploadClient:
    return KieUploadClient(settings.kie_upload_base_url, **_kie_client_options(settings))


def _kie_client_options(settings: Settings) -> dict[str, Any]:
    if settings.kie_api_key is None:
        raise RuntimeError("KIE_API_KEY is not set")
    return {
        "api_key": settings.kie_api_key,
        "connect_timeout": settings.kie_connect_timeout_s,
        "read_timeout": settings.kie_read_timeout_s,
        "request_deadline": settings.kie_request_deadline_s,
        "secrets": tuple(settings.secrets()),
    }


def new_ideogram_client(settings: Settings) -> IdeogramClient:
    if settings.ideogram_base_url is None or settings.ideogram_api_key is None:
        raise ProviderNotConfigured(IDEOGRAM_PROVIDER)
    return IdeogramClient(
        settings.ideogram_base_url,
        settings.ideogram_api_key,
        status_path=settings.ideogram_status_path,
        state_map=parse_state_map(settings.ideogram_state_map),
        connect_timeout=settings.ideogram_connect_timeout_s,
        read_timeout=settings.ideogram_read_timeout_s,
        request_deadline=settings.ideogram_request_deadline_s,
        status_read_timeout=settings.kie_read_timeout_s,
        status_deadline=settings.kie_request_deadline_s,
        secrets=tuple(settings.secrets()),
    )


def _provider_parts(
    settings: Settings, broker: redis.Redis, key_id: str, rate_limit: str
) -> ProviderParts:
    limit, window = parse_rate_limit(rate_limit)
    return ProviderParts(
        api_key_id=key_id,
        rate_limit=rate_limit,
        limiter=SharedRateLimiter(broker, key_id, limit, window),
        pause=FleetPause(broker, key_id, settings.remix_pause_probe_s),
        spend=SpendCap(broker, key_id, settings.spend_caps),
    )


#: Blobs outlive the longest a job may wait to be sent by this much.
BLOB_TTL_MARGIN_S = 3600


def blob_ttl_s(settings: Settings) -> int:
    """How long a source image is kept: as long as its job may still be sent, and more."""
    return int(settings.remix_submit_deadline_s + settings.attempt_settle_s + BLOB_TTL_MARGIN_S)


def build_services(
    settings: Settings, app: Any = None, redis_retry_s: float | None = None
) -> Services:
    """Build every collaborator from ``settings``.

    ``app``: the Celery app to publish with; ``redis_retry_s``: see :func:`redis_client`.
    """
    if app is None:
        from worker.app import app
    backend = redis_client(settings.backend_url, redis_retry_s)
    broker = (
        backend
        if settings.backend_url == settings.redis_url
        else redis_client(settings.redis_url, redis_retry_s)
    )
    kie = _provider_parts(settings, broker, api_key_id(settings), settings.kie_rate_limit)
    providers = {PROVIDER: kie}
    if settings.ideogram_configured:
        relay_id, relay_limit = ideogram_key_id(settings), settings.ideogram_rate_limit
        providers[IDEOGRAM_PROVIDER] = _provider_parts(settings, broker, relay_id, relay_limit)
    clock = RedisClock(backend)
    return Services(
        settings=settings,
        store=JobStore(backend, ttl_s=settings.remix_job_ttl_s, archive=settings.archive_enabled),
        clock=clock,
        limiter=kie.limiter,
        spend=kie.spend,
        pause=kie.pause,
        publisher=Publisher(app, clock),
        metrics=Metrics(broker),
        results=CeleryResults(app),
        api_key_id=kie.api_key_id,
        broker=broker,
        redactor=Redactor(settings.secrets()),
        blobs=blob_store_for(
            settings.remix_blob_url, backend, blob_ttl_s(settings), settings.remix_blob_max_bytes
        ),
        providers=providers,
    )


_lock = threading.Lock()
_cache: dict[int, Services] = {}


def services() -> Services:
    """This process's services (built on first use, and again in a forked child)."""
    pid = os.getpid()
    found = _cache.get(pid)
    if found is None:
        with _lock:
            found = _cache.get(pid)
            if found is None:
                _cache.clear()
                found = _cache[pid] = build_services(get_settings())
    return found


def _reset() -> None:
    with _lock:
        _cache.clear()


def configure(**overrides: Any) -> Settings:
    """Point this process at other settings (tests, the demo, the benchmark).

    ``overrides`` are settings fields (``redis_url=...``) that win over the environment.
    The Celery app follows the new Redis URLs; every cached client is dropped.
    """
    from worker.app import app

    set_overrides(**overrides)
    _reset()
    settings = get_settings()
    app.conf.broker_url = settings.redis_url
    app.conf.result_backend = settings.backend_url
    _forget_celery_connections(app)
    return settings


def _forget_celery_connections(app: Any) -> None:
    """Drop the broker pool and result backend Celery built for the previous URLs.

    Celery has no public way to do this; these attributes are stable across Celery 5.
    kombu keeps its pools in process-wide registries keyed by the connection's URL, so
    the closed pool leaves them too: else the next publish to the same URL would get it
    back ("Acquire on closed pool").
    """
    with contextlib.suppress(AttributeError):
        del app._local.backend
    closed = getattr(app, "_pool", None)
    if closed is not None:
        closed.force_close_all()
        app._pool = None
        _unregister_pool(closed)
    if getattr(app.amqp, "_producer_pool", None) is not None:
        app.amqp._producer_pool = None


def _unregister_pool(closed: Any) -> None:
    """Remove a closed connection pool, and the producer pools on it, from kombu's registries."""
    from kombu import pools

    # The registries' keys are already hashed (kombu's EqualityDict), so they are removed
    # with the plain dict method rather than ``del``, which would hash them again.
    for key, pool in list(pools.connections.items()):
        if pool is closed:
            dict.pop(pools.connections, key, None)
    for key, pool in list(pools.producers.items()):
        if getattr(pool, "connections", None) is closed:
            dict.pop(pools.producers, key, None)


# ----------------------------------------------------------------- the keys workers use


def _own_keys(svc: Services) -> list[ProviderParts]:
    """The parts of each provider this process has a key for."""
    return [svc.providers[name] for name in configured_providers(svc.settings)]


def register_api_key() -> None:
    """Make this worker's keys (one per provider) known to ``remixq status`` and ``pause``."""
    svc = services()
    for parts in _own_keys(svc):
        svc.broker.hset(keys.KNOWN_API_KEYS, parts.api_key_id, parts.rate_limit)
        if parts.spend.enabled:
            cap = svc.settings.remix_spend_cap or ""
            svc.broker.hset(keys.KNOWN_SPEND_CAPS, parts.api_key_id, cap)
        else:
            svc.broker.hdel(keys.KNOWN_SPEND_CAPS, parts.api_key_id)


def known_api_keys(svc: Services | None = None) -> dict[str, str]:
    """Key id -> its rate limit, for every key a worker registered (and our own)."""
    svc = svc or services()
    found = {
        decode_text(k): decode_text(v) for k, v in svc.broker.hgetall(keys.KNOWN_API_KEYS).items()
    }
    for parts in _own_keys(svc):
        found.setdefault(parts.api_key_id, parts.rate_limit)
    return found


def limiter_for(key_id: str, rate_limit: str) -> SharedRateLimiter:
    limit, window = parse_rate_limit(rate_limit)
    return SharedRateLimiter(services().broker, key_id, limit, window)


def pause_for(key_id: str) -> FleetPause:
    return FleetPause(services().broker, key_id, services().settings.remix_pause_probe_s)


def spend_cap_for(key_id: str) -> SpendCap:
    """The spend cap a worker registered for ``key_id`` (or this process's own; may be off)."""
    svc = services()
    raw = svc.broker.hget(keys.KNOWN_SPEND_CAPS, key_id)
    text = decode_text(raw) if raw is not None else None
    if text is None and key_id in {parts.api_key_id for parts in _own_keys(svc)}:
        text = svc.settings.remix_spend_cap
    return SpendCap(svc.broker, key_id, parse_spend_cap(text))
