"""The legacy remix relay's side of the sandbox: ``POST /ideogram/remix`` and its status.

Pure helpers used by :class:`sandbox.api.SandboxApi`: reading the multipart body (an
``image_request`` JSON text and an ``image_file``), checking it as the relay would, and
the two answer forms. The relay answers a request it refuses with HTTP 400 and
``{"code": 400, "message"}``, as Ideogram's API does for an ``aspect_ratio`` given with a
``resolution``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from sandbox.multipart import MultipartError, parse_form
from sandbox.validation import RequestError
from worker.images import check_image_bytes
from worker.models import InvalidRequestError

REMIX_PATH = "/ideogram/remix"
STATUS_PATH = re.compile(r"/ideogram/remix/(?P<task_id>[^/]+)")
RELAY_MODEL = "ideogram-remix"
MAX_NUM_IMAGES = 8
RESOLUTION = re.compile(r"^RESOLUTION_\d+_\d+$")


@dataclass(frozen=True)
class RelayRequest:
    """A remix request that passed the relay's checks."""

    image_request: dict[str, Any]
    image: bytes
    image_type: str

    @property
    def prompt(self) -> str:
        return str(self.image_request["prompt"])

    @property
    def num_images(self) -> int:
        return int(self.image_request.get("num_images", 1))


def peek_relay_prompt(content_type: str | None, body: bytes) -> str | None:
    """The prompt of a remix body when it has one, without checking anything else."""
    try:
        parts = parse_form(content_type, body).get("image_request") or []
        data = json.loads(parts[0].data.decode()) if parts else None
    except (MultipartError, ValueError, UnicodeDecodeError):
        return None
    prompt = data.get("prompt") if isinstance(data, dict) else None
    return prompt if isinstance(prompt, str) else None


def read_relay_request(content_type: str | None, body: bytes) -> RelayRequest:
    """The checked request; raises :class:`RequestError` naming the first problem."""
    try:
        form = parse_form(content_type, body)
    except MultipartError as exc:
        raise RequestError(str(exc)) from None
    request_parts, file_parts = form.get("image_request"), form.get("image_file")
    if not request_parts:
        raise RequestError("image_request is required")
    if not file_parts or not file_parts[0].filename:
        raise RequestError("image_file is required (a file part)")
    try:
        image_request = json.loads(request_parts[0].data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise RequestError("image_request must be JSON text in UTF-8") from None
    _check_image_request(image_request)
    try:
        image_type = check_image_bytes(file_parts[0].data, "image_file")
    except InvalidRequestError as exc:
        raise RequestError(str(exc).removeprefix("invalid request: ")) from None
    return RelayRequest(image_request, file_parts[0].data, image_type)


def _check_image_request(data: Any) -> None:
    if not isinstance(data, dict):
        raise RequestError("image_request must be a JSON object")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("image_request.prompt is required")
    if "aspect_ratio" in data and "resolution" in data:
        raise RequestError("aspect_ratio and resolution cannot be used together")
    resolution = data.get("resolution")
    if resolution is not None and not (
        isinstance(resolution, str) and RESOLUTION.fullmatch(resolution)
    ):
        raise RequestError("resolution must look like RESOLUTION_1024_1024")
    count = data.get("num_images", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_NUM_IMAGES:
        raise RequestError(f"num_images must be an integer from 1 to {MAX_NUM_IMAGES}")


def sync_answer(urls: list[str], request: RelayRequest, seed: int) -> dict[str, Any]:
    """Ideogram's own answer: the images made inside the request."""
    image_request = request.image_request
    resolution = str(image_request.get("resolution", "RESOLUTION_1024_1024"))
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "data": [
            {
                "url": url,
                "prompt": request.prompt,
                "resolution": resolution.removeprefix("RESOLUTION_").replace("_", "x"),
                "is_image_safe": True,
                "seed": seed,
                "style_type": image_request.get("style_type", "AUTO"),
            }
            for url in urls
        ],
    }


def task_envelope(task_id: str, status: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The relay's envelope (``code`` 0 is success) around a task's state."""
    data: dict[str, Any] = {
        "task_id": task_id,
        "task_status": status,
        "created_at": int(time.time()),
        **(extra or {}),
    }
    return {"code": 0, "message": "SUCCEED", "request_id": f"req-{task_id}", "data": data}
