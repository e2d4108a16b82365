"""The request a producer sends and the job record everyone reads.

``RemixRequest`` enforces every constraint of the kie.ai ``character-remix``
input, so a bad request is refused before anything is enqueued (producers) and
again before anything is sent upstream (the worker, for producers that speak
the Celery protocol directly).
"""

from __future__ import annotations

import enum
import math
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    model_validator,
)

from worker.fields import DEFAULT_PRIORITY, DEFAULT_TENANT, BlobRef, not_a_boolean, not_blank
from worker.relay_models import DEFAULT_MODEL as IDEOGRAM_DEFAULT_MODEL
from worker.relay_models import PROVIDER as IDEOGRAM_PROVIDER
from worker.relay_models import IdeogramRemixRequest

PROVIDER = "kie"
#: The upstreams a job may be sent to (``provider``); ``kie`` is the default.
PROVIDERS = ("kie", "ideogram-remix")
MAX_PROMPT_CHARS = 5000
MAX_NEGATIVE_PROMPT_CHARS = 500
STRENGTH_STEP = 0.1
#: Most reference images given as files (each one is uploaded before createTask, and the
#: model uses only the first reference).
MAX_REFERENCE_FILES = 8
#: Seeds are 31-bit, as Ideogram's own API takes them.
MAX_SEED = 2**31 - 1


def check_http_url(value: str) -> str:
    """An http(s) URL with a host and a valid port; raises ``ValueError`` otherwise."""
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError:
        raise ValueError("must be an http(s) URL") from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or any(c.isspace() for c in value)
    ):
        raise ValueError("must be an http(s) URL")
    return value


def _num_images(value: Any) -> Any:
    # The upstream enum is a string ("1".."4"); an int is accepted and converted.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _strength_step(value: float) -> float:
    tenths = value / STRENGTH_STEP
    if not math.isclose(tenths, round(tenths), abs_tol=1e-9):
        raise ValueError("must be a multiple of 0.1")
    return round(value, 1)


HttpUrl = Annotated[str, AfterValidator(check_http_url)]


class RemixRequest(BaseModel):
    """The ``input`` object of a createTask call for ``ideogram/character-remix``."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    prompt: Annotated[str, AfterValidator(not_blank)] = Field(
        min_length=1, max_length=MAX_PROMPT_CHARS
    )
    #: The source image: a URL, or a file a producer stored (``image_file``), not both.
    image_url: HttpUrl | None = None
    reference_image_urls: list[HttpUrl] | None = Field(None, min_length=1)
    #: Source images given as files (kept in the blob store; never sent as such: the
    #: worker uploads them and sends the URLs, see :meth:`upstream_input`).
    image_file: BlobRef | None = None
    reference_image_files: list[BlobRef] | None = Field(
        None, min_length=1, max_length=MAX_REFERENCE_FILES
    )
    rendering_speed: Literal["TURBO", "BALANCED", "QUALITY"] | None = None
    style: Literal["AUTO", "REALISTIC", "FICTION"] | None = None
    expand_prompt: StrictBool | None = None
    image_size: (
        Literal[
            "square",
            "square_hd",
            "portrait_4_3",
            "portrait_16_9",
            "landscape_4_3",
            "landscape_16_9",
        ]
        | None
    ) = None
    num_images: Annotated[Literal["1", "2", "3", "4"], BeforeValidator(_num_images)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = None
    strength: (
        Annotated[
            float,
            BeforeValidator(not_a_boolean),
            Field(ge=0.1, le=1.0),
            AfterValidator(_strength_step),
        ]
        | None
    ) = None
    negative_prompt: str | None = Field(None, max_length=MAX_NEGATIVE_PROMPT_CHARS)
    image_urls: list[HttpUrl] | None = Field(None, min_length=1)
    reference_mask_urls: HttpUrl | None = None

    @model_validator(mode="after")
    def _one_source_and_a_reference(self) -> RemixRequest:
        if (self.image_url is None) == (self.image_file is None):
            raise ValueError("give exactly one of image_url and image_file")
        if not (self.reference_image_urls or self.reference_image_files):
            raise ValueError(
                "give at least one reference image (reference_image_urls or reference_image_files)"
            )
        return self

    def files(self) -> list[BlobRef]:
        """The source images given as files: ``image_file`` first, then the references."""
        return [
            *([self.image_file] if self.image_file else []),
            *(self.reference_image_files or []),
        ]

    def stored(self) -> dict[str, Any]:
        """The request as a job keeps it: the given fields, files as blob references."""
        return self.model_dump(mode="json", exclude_none=True)

    def upstream_input(self, uploaded: dict[str, str] | None = None) -> dict[str, Any]:
        """The createTask ``input``: only the fields that were given, never a file.

        ``uploaded`` maps each file's blob id to the URL it was uploaded to; a file's URL
        takes its place (``image_url``, and the reference URLs given first, then the
        reference files, each in the order given). Raises ``KeyError`` for a file not
        uploaded.
        """
        data = self.model_dump(
            mode="json", exclude_none=True, exclude={"image_file", "reference_image_files"}
        )
        urls = uploaded or {}
        if self.image_file is not None:
            data["image_url"] = urls[self.image_file.blob]
        if self.reference_image_files:
            data["reference_image_urls"] = [
                *(self.reference_image_urls or []),
                *(urls[ref.blob] for ref in self.reference_image_files),
            ]
        return data


#: The request model of each provider.
REQUEST_MODELS: dict[str, type[RemixRequest] | type[IdeogramRemixRequest]] = {
    PROVIDER: RemixRequest,
    IDEOGRAM_PROVIDER: IdeogramRemixRequest,
}
KIE_MODEL = "ideogram/character-remix"


def upstream_model(provider: str, request: Any) -> str:
    """The record's ``model``: kie.ai's model name, or the relay's model of the request."""
    if provider != IDEOGRAM_PROVIDER:
        return KIE_MODEL
    chosen = request.get("model") if isinstance(request, dict) else None
    return chosen if isinstance(chosen, str) and chosen else IDEOGRAM_DEFAULT_MODEL


class InvalidRequestError(ValueError):
    """A request that breaks a documented constraint; ``str()`` is one line."""

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        self.errors = errors or []
        super().__init__(message)


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming every bad field: ``strength: must be a multiple of 0.1; ...``."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "is not a known input field"
        parts.append(f"{where}: {message}" if where else message)
    return "invalid request: " + "; ".join(parts)


#: The request fields naming files in the blob store, set only by a producer that read them.
FILE_FIELDS = ("image_file", "reference_image_files")


def refuse_file_fields(data: Any, instead: str) -> None:
    """Refuse a request that names blobs itself (JSON bodies, batch lines): files come only
    through a producer that reads them (``instead`` names how)."""
    given = [name for name in FILE_FIELDS if isinstance(data, dict) and name in data]
    if given:
        raise InvalidRequestError(f"invalid request: {given[0]}: files are taken by {instead}")


def validate_request(data: Any, provider: str = PROVIDER) -> RemixRequest | IdeogramRemixRequest:
    """Validate a request dict for ``provider``'s model, raising :class:`InvalidRequestError`.

    Either model's ``upstream_input()`` is what the job stores and the worker sends.
    """
    model = REQUEST_MODELS.get(provider) if isinstance(provider, str) else None
    if model is None:
        known = ", ".join(PROVIDERS)
        raise InvalidRequestError(
            f"invalid request: provider: must be one of {known}, not {str(provider)[:40]!r}"
        )
    if not isinstance(data, dict):
        raise InvalidRequestError("invalid request: expected a JSON object of input fields")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequestError(
            describe_validation_error(exc), list(map(dict, exc.errors()))
        ) from None


class JobState(enum.StrEnum):
    QUEUED = "queued"
    SUBMITTED = "submitted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATES


FINISHED_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class Notification(BaseModel):
    """Delivery of a job's completion webhook (``notify_url``)."""

    state: Literal["pending", "delivered", "failed"]
    attempts: int = 0
    delivered_at: float | None = None
    last_error: str | None = None


class ArchivedImage(BaseModel):
    """One result image stored in the archive (``REMIX_ARCHIVE_URL``)."""

    #: ``file:///dir/<job_id>/0.png`` or ``s3://bucket/prefix/<job_id>/0.png``.
    location: str
    bytes: int
    sha256: str
    content_type: str
    #: The upstream result URL it was fetched from (an entry of ``result_urls``).
    source_url: str


class Archive(BaseModel):
    """Archiving of a succeeded job's result images (with ``REMIX_ARCHIVE_URL`` set)."""

    state: Literal["pending", "done", "failed"]
    attempts: int = 0
    archived_at: float | None = None
    last_error: str | None = None


class JobRecord(BaseModel):
    """One job as producers see it (the public record of the design document).

    Once a job has finished, its ``state``, results and failure never change. Only these
    may still change: ``extra_task_ids`` and ``possibly_paid_twice`` (a further upstream
    charge found later, by a callback or a lost answer), ``notification`` (delivery
    of the completion webhook), and ``archive`` and ``archived`` (archiving of the result
    images, written by ``archive_end.lua``).
    """

    job_id: str
    state: JobState
    provider: str = PROVIDER
    model: str = KIE_MODEL
    tenant: str = DEFAULT_TENANT
    priority: str = DEFAULT_PRIORITY
    upstream_task_id: str | None = None
    result_urls: list[str] = Field(default_factory=list)
    fail_code: str | None = None
    fail_msg: str | None = None
    submit_attempts: int = 0
    polls: int = 0
    created_at: float
    submitted_at: float | None = None
    finished_at: float | None = None
    #: When the createTask request now under way was started (None when none is).
    attempt_started_at: float | None = None
    #: createTask requests whose outcome never became known (the answer was lost).
    unknown_outcomes: int = 0
    #: Sent again after an attempt of unknown outcome and accepted: may have been charged twice.
    possibly_paid_twice: bool = False
    #: Further upstream tasks accepted for this job besides ``upstream_task_id`` (charges).
    extra_task_ids: list[str] = Field(default_factory=list)
    #: Delivery of the completion webhook, for a job enqueued with a ``notify_url``.
    notification: Notification | None = None
    #: Archiving of the result images, for a job that succeeded while archiving was on.
    archive: Archive | None = None
    #: The archived copies of ``result_urls``, in their order (once ``archive`` is done).
    archived: list[ArchivedImage] = Field(default_factory=list)
    #: The job this one replays (``remixq retry``), written when it is created.
    retry_of: str | None = None

    @property
    def finished(self) -> bool:
        return self.state.finished
