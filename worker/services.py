"""The composition root: every collaborator of the pipeline, built once from the settings.

The policies take a :class:`Services` as their argument, so each path can be tested
against a real Redis (and the sandbox) without starting a worker. The per-process
singleton lives beside the Celery app (:func:`worker.app.services`). See
docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import states
from celery.backends.base import BaseKeyValueStoreBackend

from worker.limits.pause import FleetPause
from worker.limits.ratelimit import SharedRateLimiter
from worker.limits.spendcap import SpendCap
from worker.models import JobRecord, JobState
from worker.redaction import Redactor
from worker.settings import Settings, parse_rate_limit
from worker.store.blobs import BlobStore, FileBlobStore, RedisBlobStore
from worker.store.clock import RedisClock
from worker.store.connection import redis_client
from worker.store.jobs import JobStore
from worker.store.lines import WaitingLines
from worker.store.metrics import Metrics
from worker.store.publisher import Publisher
from worker.upstreams.errors import JobFailed
from worker.upstreams.kie import KieClient
from worker.upstreams.kie_upload import KieUploadClient
from worker.upstreams.providers import (
    KIE,
    PROFILES,
    ProviderNotConfigured,
    ProviderProfile,
    configured_providers,
    new_ideogram_client,
    new_kie_client,
    new_upload_client,
)
from worker.upstreams.relay import IdeogramClient


@dataclass(frozen=True)
class ProviderParts:
    """The per-key state of one upstream: its rate limit, pause and spend cap."""

    api_key_id: str
    rate_limit: str
    limiter: SharedRateLimiter
    pause: FleetPause
    spend: SpendCap


class CeleryResults:
    """Stores a finished job's outcome as its Celery result (its task id is the job id)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def store(self, record: JobRecord) -> None:
        result: Any = record.model_dump(mode="json")
        state = states.SUCCESS
        if record.state is not JobState.SUCCEEDED:
            result = JobFailed(record.fail_code or record.state.value, record.fail_msg or "")
            state = states.FAILURE
        backend = self.app.backend
        if not isinstance(backend, BaseKeyValueStoreBackend):
            backend.store_result(record.job_id, result, state)
            return
        # Celery's store_result first reads the stored result, so that a lost task never
        # overwrites a SUCCESS. A job finishes once (update.lua), so that read would be a
        # round trip for nothing on every job; the write is Celery's own.
        meta = backend._get_result_meta(
            result=backend.encode_result(result, state), state=state, traceback=None, request=None
        )
        meta["task_id"] = record.job_id
        backend._set_with_state(
            backend.get_key_for_task(record.job_id), backend.encode(meta), state
        )


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
    lines: WaitingLines
    #: The upstream the per-key parts above belong to (see :meth:`for_provider`).
    profile: ProviderProfile = KIE
    providers: dict[str, ProviderParts] = field(default_factory=dict, repr=False)
    _local: threading.local = field(default_factory=threading.local, repr=False)

    @property
    def provider(self) -> str:
        return self.profile.name

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
        return self.relay_client() if self.profile.answers_synchronously else self.client()

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
            profile=PROFILES[name],
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


def _provider_parts(
    settings: Settings, broker: redis.Redis, profile: ProviderProfile
) -> ProviderParts:
    key_id, rate_limit = profile.key_id(settings), profile.rate_limit(settings)
    limit, window = parse_rate_limit(rate_limit)
    return ProviderParts(
        api_key_id=key_id,
        rate_limit=rate_limit,
        limiter=SharedRateLimiter(broker, key_id, limit, window),
        pause=FleetPause(broker, key_id, settings.remix_pause_probe_s),
        spend=SpendCap(broker, key_id, settings.spend_caps),
    )


def blob_store_for(url: str | None, client: redis.Redis, ttl_s: int, max_bytes: int) -> BlobStore:
    """The store ``REMIX_BLOB_URL`` names: unset, the job store's Redis; ``file:///dir``;
    ``s3://bucket/prefix`` (:mod:`worker.store.blobs_s3`, imported only then: boto3 is needed)."""
    if not url:
        return RedisBlobStore(client, ttl_s, max_bytes)
    parts = urlsplit(url)
    if parts.scheme == "file" and parts.path.startswith("/") and parts.netloc in ("", "localhost"):
        return FileBlobStore(Path(parts.path), ttl_s)
    if parts.scheme == "s3" and parts.netloc:
        from worker.store.blobs_s3 import S3BlobStore

        prefix = parts.path.strip("/")
        return S3BlobStore(parts.netloc, f"{prefix}/" if prefix else "")
    raise ValueError("REMIX_BLOB_URL must be file:///absolute/dir, s3://bucket/prefix or unset")


#: Blobs outlive the longest a job may wait to be sent by this much.
BLOB_TTL_MARGIN_S = 3600


def blob_ttl_s(settings: Settings) -> int:
    """How long a source image is kept: as long as its job may still be sent, and more."""
    return int(settings.remix_submit_deadline_s + settings.attempt_settle_s + BLOB_TTL_MARGIN_S)


def build_services(settings: Settings, app: Any, redis_retry_s: float | None = None) -> Services:
    """Build every collaborator from ``settings``.

    ``app``: the Celery app to publish with; ``redis_retry_s``: see :func:`redis_client`.
    """
    backend = redis_client(settings.backend_url, redis_retry_s)
    broker = (
        backend
        if settings.backend_url == settings.redis_url
        else redis_client(settings.redis_url, redis_retry_s)
    )
    # kie.ai's parts always exist: they are the services' defaults.
    providers = {
        name: _provider_parts(settings, broker, profile)
        for name, profile in PROFILES.items()
        if profile is KIE or profile.configured(settings)
    }
    kie = providers[KIE.name]
    clock = RedisClock(backend)
    return Services(
        settings=settings,
        store=JobStore(
            backend,
            ttl_s=settings.remix_job_ttl_s,
            archive=settings.archive_enabled,
            max_waiting=settings.remix_tenant_max_waiting,
        ),
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
        lines=WaitingLines(backend, ttl_s=settings.remix_job_ttl_s),
        blobs=blob_store_for(
            settings.remix_blob_url, backend, blob_ttl_s(settings), settings.remix_blob_max_bytes
        ),
        providers=providers,
    )
