"""The upstream keys the fleet knows: each worker registers its own, with its rate limit
and spend cap, so that ``remixq status``, ``pause`` and ``resume`` can act on every key.
See docs/operations.md.
"""

from __future__ import annotations

from worker import keys
from worker.limits.pause import FleetPause
from worker.limits.ratelimit import SharedRateLimiter
from worker.limits.spendcap import SpendCap
from worker.services import ProviderParts, Services
from worker.settings import parse_rate_limit, parse_spend_cap
from worker.store.jobs import decode_text
from worker.upstreams.providers import configured_providers


def _own_keys(svc: Services) -> list[ProviderParts]:
    """The parts of each provider this process has a key for."""
    return [svc.providers[name] for name in configured_providers(svc.settings)]


def register_api_key(svc: Services) -> None:
    """Make this worker's keys (one per provider) known to ``remixq status`` and ``pause``."""
    for parts in _own_keys(svc):
        svc.broker.hset(keys.KNOWN_API_KEYS, parts.api_key_id, parts.rate_limit)
        if parts.spend.enabled:
            cap = svc.settings.remix_spend_cap or ""
            svc.broker.hset(keys.KNOWN_SPEND_CAPS, parts.api_key_id, cap)
        else:
            svc.broker.hdel(keys.KNOWN_SPEND_CAPS, parts.api_key_id)


def known_api_keys(svc: Services) -> dict[str, str]:
    """Key id -> its rate limit, for every key a worker registered (and our own)."""
    found = {
        decode_text(k): decode_text(v) for k, v in svc.broker.hgetall(keys.KNOWN_API_KEYS).items()
    }
    for parts in _own_keys(svc):
        found.setdefault(parts.api_key_id, parts.rate_limit)
    return found


def limiter_for(svc: Services, key_id: str, rate_limit: str) -> SharedRateLimiter:
    limit, window = parse_rate_limit(rate_limit)
    return SharedRateLimiter(svc.broker, key_id, limit, window)


def pause_for(svc: Services, key_id: str) -> FleetPause:
    return FleetPause(svc.broker, key_id, svc.settings.remix_pause_probe_s)


def spend_cap_for(svc: Services, key_id: str) -> SpendCap:
    """The spend cap a worker registered for ``key_id`` (or this process's own; may be off)."""
    raw = svc.broker.hget(keys.KNOWN_SPEND_CAPS, key_id)
    text = decode_text(raw) if raw is not None else None
    if text is None and key_id in {parts.api_key_id for parts in _own_keys(svc)}:
        text = svc.settings.remix_spend_cap
    return SpendCap(svc.broker, key_id, parse_spend_cap(text))
