"""What the relay tests share: a PNG, the relay's key, and a relay job in the store."""

from __future__ import annotations

import io
import uuid
from typing import Any

from PIL import Image

from producers.api import JobOptions, enqueue_validated
from worker.fields import BlobRef
from worker.models import validate_request
from worker.services import Services
from worker.store.blobs import put

RELAY = "ideogram-remix"
#: A distinctive relay key, so that a leak into a log, a record or a message is found.
RELAY_API_KEY = f"sk-relay-SECRET-{uuid.uuid4().hex}"


def png_bytes(colour: tuple[int, int, int] = (200, 40, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def relay_payload(svc: Services, prompt: str, **fields: Any) -> tuple[dict[str, Any], BlobRef]:
    """A validated relay request whose source image is stored in ``svc.blobs``."""
    ref = put(svc.blobs, png_bytes(), "image/png", "src.png")
    data = {"prompt": prompt, "image_file": ref.model_dump(), **fields}
    return validate_request(data, RELAY).upstream_input(), ref


def new_relay_job(svc: Services, prompt: str | None = None, **fields: Any) -> tuple[str, str]:
    """Create a queued relay job (due at once) in the store; returns ``(job_id, prompt)``."""
    prompt = prompt or f"relay {uuid.uuid4().hex[:10]}"
    payload, _ = relay_payload(svc, prompt, **fields)
    job_id = uuid.uuid4().hex
    svc.store.create(job_id, payload, due_in=0.0, provider=RELAY)
    return job_id, prompt


def enqueue_relay_job(svc: Services, prompt: str, **fields: Any) -> str:
    """Enqueue a relay job the way a producer does (record and first message)."""
    payload, _ = relay_payload(svc, prompt, **fields)
    job_id, created = enqueue_validated(payload, JobOptions(provider=RELAY))
    assert created
    return job_id
