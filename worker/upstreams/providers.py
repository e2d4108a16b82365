"""One profile per upstream, chosen once: what differs between providers lives here.

kie.ai (``kie``) and the legacy remix relay (``ideogram-remix``). Each key has its own
rate limit, pause and spend cap, named by a short non-secret id; a policy asks the job's
:class:`ProviderProfile` instead of branching on the provider's name. A third upstream
is one client module and one entry of :data:`PROFILES`. See docs/architecture.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
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


def _relay_configured(settings: Settings) -> bool:
    return settings.ideogram_configured


@dataclass(frozen=True)
class ProviderProfile:
    """What the pipeline needs to know of one upstream."""

    name: str
    #: The settings a worker needs for it (named in errors).
    needs: str
    configured: Callable[[Settings], bool]
    key_id: Callable[[Settings], str]
    rate_limit: Callable[[Settings], str]
    #: It calls back when a task ends (``KIE_CALLBACK_URL``): the first poll comes later,
    #: and a createTask whose answer was lost waits for a callback naming its task.
    calls_back: bool
    #: After an answer was lost (the request may have been charged), the job may be sent
    #: again, flagged; without it the job fails rather than pay twice.
    resends_after_lost_answer: bool
    #: The key has a balance to ask (a 402 that repeats may then be the job's own).
    has_balance: bool
    #: It answers the remix itself (synchronously); its status is asked of the relay.
    answers_synchronously: bool


KIE = ProviderProfile(
    name=PROVIDER,
    needs="KIE_API_KEY",
    configured=lambda settings: settings.kie_api_key is not None,
    key_id=api_key_id,
    rate_limit=lambda settings: settings.kie_rate_limit,
    calls_back=True,
    resends_after_lost_answer=True,
    has_balance=True,
    answers_synchronously=False,
)
RELAY = ProviderProfile(
    name=IDEOGRAM_PROVIDER,
    needs="IDEOGRAM_BASE_URL and IDEOGRAM_API_KEY",
    configured=_relay_configured,
    key_id=ideogram_key_id,
    rate_limit=lambda settings: settings.ideogram_rate_limit,
    calls_back=False,
    resends_after_lost_answer=False,
    has_balance=False,
    answers_synchronously=True,
)
#: Every provider, kie.ai first.
PROFILES: dict[str, ProviderProfile] = {profile.name: profile for profile in (KIE, RELAY)}


class ProviderNotConfigured(Exception):
    """A job names a provider this process has no URL or key for; ``str()`` is one line."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        needs = PROFILES[provider].needs if provider in PROFILES else "its settings"
        super().__init__(f"provider {provider} is not configured on this worker (set {needs})")


def configured_providers(settings: Settings) -> list[str]:
    """The providers this process has settings for, kie.ai first."""
    return [name for name, profile in PROFILES.items() if profile.configured(settings)]


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
