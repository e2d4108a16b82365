"""Which upstreams a process has settings for, their key ids and their clients.

kie.ai (``kie``) and the legacy remix relay (``ideogram-remix``); each key has its own
rate limit, pause and spend cap, named by a short non-secret id. See docs/architecture.md.
"""

from __future__ import annotations

import hashlib
from typing import Any

from worker.models import PROVIDER, PROVIDERS
from worker.settings import Settings, parse_state_map
from worker.upstreams.kie import KieClient
from worker.upstreams.kie_upload import KieUploadClient
from worker.upstreams.relay import IdeogramClient


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


def configured_providers(settings: Settings) -> list[str]:
    """The providers this process has settings for, kie.ai first."""
    found = [PROVIDER] if settings.kie_api_key is not None else []
    return found + ([IDEOGRAM_PROVIDER] if settings.ideogram_configured else [])


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
