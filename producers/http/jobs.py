"""The jobs routes of the HTTP app: enqueue, read (with a long poll), list, batch, cancel.

They are the Python API (:mod:`producers.api`) over HTTP, for services not written in
Python: the same request model and validation as ``enqueue_remix``, the same records.
Every route sees only the jobs of the caller's tenant, which comes from its bearer token
(:mod:`producers.http.guard`), never from the body: another tenant's job answers ``404``
exactly like an unknown one, and a tenant over ``REMIX_TENANT_MAX_WAITING`` gets ``429``
with ``Retry-After`` (docs/tenants.md).
Redis calls are synchronous (the job store's Lua scripts), so each runs in the thread
pool; a long poll waits on the app's one subscription (:mod:`producers.http.longpoll`), not
in a thread. A Redis error becomes ``503`` in :mod:`producers.http`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema
from starlette.concurrency import run_in_threadpool

from producers.api import (
    CANCEL_REFUSALS,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_NOTIFY_URL_CHARS,
    JobNotCancellable,
    JobOptions,
    cancel_job,
    check_notify_url,
    enqueue_many_validated,
    enqueue_validated,
)
from producers.http.guard import (
    API_PREFIX,
    BATCH_ROUTE,
    JOBS_ROUTE,
    UPLOAD_ROUTE,
    job_location,
    tenant_of,
)
from producers.http.longpoll import (
    MAX_WAIT_S,
    FinishedWatch,
    read_record,
    visible,
    wait_for_record,
)
from worker import keys
from worker.app import services
from worker.fields import DEFAULT_PRIORITY, PRIORITIES, Priority
from worker.models import (
    FILE_FIELDS,
    PROVIDER,
    PROVIDERS,
    HttpUrl,
    InvalidRequestError,
    JobRecord,
    JobState,
    RemixRequest,
)
from worker.settings import get_settings
from worker.store.jobs import NOTIFY_URL_FIELD, REQUEST_FIELD, QueueFull

MAX_BATCH = 1000
DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_CURSOR_CHARS = 512
MAX_JOB_ID_CHARS = 200
#: Upstreams whose source image can only be a file (refused by the JSON route).
FILE_ONLY_PROVIDERS = ("ideogram-remix",)
#: ``Retry-After`` of a ``429`` (the tenant's waiting jobs are at their limit) is the time
#: the key needs to send as many jobs as are over the limit, at its full rate, within these
#: bounds: a lower bound of the wait, since other tenants share the key.
RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 60
#: Why a body may not name its tenant.
TENANT_FROM_TOKEN = "the tenant comes from the bearer token, never from the body"

#: Documents the bearer scheme in the OpenAPI document; the check is in
#: :mod:`producers.http.guard`, before the body is read.
bearer = HTTPBearer(
    auto_error=False,
    description="One of the tokens of REMIX_API_TOKENS (required only when it is set).",
)
router = APIRouter(prefix=API_PREFIX, tags=["jobs"], dependencies=[Depends(bearer)])


def caller_tenant(request: Request) -> str:
    """The caller's tenant, as the guard found it from the bearer token."""
    tenant = tenant_of(request.scope)
    if tenant is None:  # the guard runs before every jobs route: this is a bug
        raise HTTPException(401, "a valid bearer token is required")
    return tenant


#: The caller's tenant, a dependency of every jobs route.
Tenant = Annotated[str, Depends(caller_tenant)]


# ------------------------------------------------------------------ models


#: What the URL fields accept, as a JSON Schema pattern (the check itself is the model's).
URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9.-]+(:[0-9]{1,4})?(/[!-~]*)?$"
URL_FIELDS = ("image_url", "reference_mask_urls", "notify_url")
URL_LIST_FIELDS = ("reference_image_urls", "image_urls")
EXAMPLE = {
    "prompt": "the character as an astronaut on the moon",
    "image_url": "https://example.com/source.png",
    "reference_image_urls": ["https://example.com/character.png"],
    "strength": 0.6,
    "idempotency_key": "order-1234",
}


def _document_constraints(schema: dict[str, Any]) -> None:
    """Say in the OpenAPI document what the validators check: http(s) URLs, a prompt that
    is not blank, the bounds of ``strength``, ``num_images`` as an int (so that generated
    clients and fuzzers send valid requests)."""
    properties = schema.get("properties", {})

    def with_pattern(field: dict[str, Any], pattern: str) -> None:
        for option in field.get("anyOf", [field]):
            if option.get("type") == "string":
                option["pattern"] = pattern

    for name in URL_FIELDS:
        if name in properties:
            with_pattern(properties[name], URL_PATTERN)
    for name in URL_LIST_FIELDS:
        for option in properties.get(name, {}).get("anyOf", [properties.get(name, {})]):
            if option.get("type") == "array":
                with_pattern(option["items"], URL_PATTERN)
    if "prompt" in properties:
        properties["prompt"]["pattern"] = r"\S"
    for option in properties.get("strength", {}).get("anyOf", []):
        # The model's bounds come out as pydantic's names, which JSON Schema does not know.
        for ours, theirs in (("ge", "minimum"), ("le", "maximum")):
            if ours in option:
                option[theirs] = option.pop(ours)
    num_images = properties.get("num_images", {}).get("anyOf")
    if num_images is not None:  # "1".."4" as the upstream has it, or the same as an int
        num_images.insert(1, {"type": "integer", "minimum": 1, "maximum": 4})
    schema["examples"] = [EXAMPLE]


class JobRequest(RemixRequest):
    """A remix request (the createTask ``input`` fields) and the job's own options."""

    model_config = ConfigDict(json_schema_extra=_document_constraints)

    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_IDEMPOTENCY_KEY_CHARS,
        description="The same key returns the same job and enqueues nothing new.",
    )
    notify_url: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_NOTIFY_URL_CHARS,
        description="An http(s) URL the finished job's record is POSTed to, signed.",
    )
    priority: Priority = Field(
        DEFAULT_PRIORITY,
        description=f"One of {', '.join(PRIORITIES)} (highest first): between classes the "
        "key's send moments go strictly to the higher one.",
    )
    #: Refused: the tenant comes from the bearer token only.
    tenant: SkipJsonSchema[None] = None

    @field_validator("tenant", mode="before")
    @classmethod
    def _no_tenant(cls, value: Any) -> Any:
        raise ValueError(TENANT_FROM_TOKEN)

    @field_validator("idempotency_key")
    @classmethod
    def _key_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("notify_url")
    @classmethod
    def _webhook_allowed(cls, value: str | None) -> str | None:
        allow_private = get_settings().remix_notify_allow_private
        try:
            check_notify_url(value, allow_private=allow_private)
        except InvalidRequestError as exc:
            raise ValueError(str(exc).removeprefix("invalid request: notify_url: ")) from None
        return value

    # JSON takes URLs only: files come as multipart uploads (POST /v1/jobs:upload).
    image_url: HttpUrl
    reference_image_urls: list[HttpUrl] = Field(min_length=1)
    image_file: SkipJsonSchema[None] = None  # type: ignore[assignment]
    reference_image_files: SkipJsonSchema[None] = None  # type: ignore[assignment]

    @field_validator(*FILE_FIELDS, mode="before")
    @classmethod
    def _no_files(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError(f"files are taken by POST {UPLOAD_ROUTE} (multipart/form-data)")
        return value

    def payload(self) -> dict[str, Any]:
        """The createTask input, exactly as ``enqueue_remix`` stores it."""
        return self.model_dump(
            mode="json",
            exclude_none=True,
            exclude={"idempotency_key", "notify_url", "provider", "priority", "tenant"},
        )

    def enqueued_with(self) -> Stored:
        """What a job enqueued with this request holds (an idempotent repeat must match)."""
        return Stored(self.payload(), self.notify_url, self.priority)


class OneJobRequest(JobRequest):
    """A remix request of ``POST /v1/jobs``: a :class:`JobRequest` and its upstream."""

    provider: str = Field(
        PROVIDER, description=f"The upstream the job is sent to: {', '.join(PROVIDERS)}."
    )

    @field_validator("provider")
    @classmethod
    def _takes_urls(cls, value: str) -> str:
        if value not in PROVIDERS:
            raise ValueError(f"must be one of {', '.join(PROVIDERS)}")
        if value in FILE_ONLY_PROVIDERS:
            raise ValueError(f"{value} takes its source image as a file: use POST {UPLOAD_ROUTE}")
        return value


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: list[JobRequest] = Field(min_length=1, max_length=MAX_BATCH)


class BatchResponse(BaseModel):
    jobs: list[JobRecord] = Field(description="One record per request, in order.")


class JobPage(BaseModel):
    jobs: list[JobRecord] = Field(description="Oldest first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: done.")


class ErrorResponse(BaseModel):
    detail: str


class CancelRefused(BaseModel):
    detail: str
    reason: Literal["accepted", "sending", "unknown_outcome", "finished"]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    described = {
        401: "REMIX_API_TOKENS is set and no valid bearer token came",
        404: "no such job of the caller's tenant (or its record expired)",
        409: "the idempotency key already names a job with another request",
        413: "the body is larger than this route accepts",
        429: "the tenant has as many jobs waiting to be sent as REMIX_TENANT_MAX_WAITING "
        "allows; nothing was enqueued (see Retry-After)",
        503: "Redis is unavailable",
    }
    return {code: {"model": ErrorResponse, "description": described[code]} for code in codes}


def queue_full(exc: QueueFull) -> HTTPException:
    """The ``429`` of a tenant at its limit, with ``Retry-After`` (see
    :data:`RETRY_AFTER_MIN_S`)."""
    count, window = get_settings().rate_limit
    seconds = math.ceil(exc.excess * window / count)
    retry_after = min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, seconds))
    return HTTPException(429, str(exc), headers={"Retry-After": str(retry_after)})


# ------------------------------------------------------------------ enqueue


class IdempotencyConflict(Exception):
    def __init__(self, indexes: list[int], owner: str | None = None) -> None:
        self.indexes = indexes
        self.owner = owner
        super().__init__(indexes)


def _invalid(loc: Sequence[str | int], message: str, value: Any = None) -> RequestValidationError:
    """A 422 in FastAPI's own format, for checks made after the model's validation."""
    return RequestValidationError(
        [{"type": "value_error", "loc": tuple(loc), "msg": message, "input": value}]
    )


@dataclass(frozen=True)
class Stored:
    """What a job was enqueued with, that an idempotent repeat must match."""

    request: Any
    notify_url: Any
    priority: Any


def _stored(job_ids: Sequence[str]) -> list[Stored]:
    """The request, notify URL and priority each job was enqueued with, in one round trip."""
    pipe = services().store.redis.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hmget(keys.job(job_id), [REQUEST_FIELD, NOTIFY_URL_FIELD, "priority"])
    return [
        Stored(_decoded(request), _decoded(url), _decoded(priority) or DEFAULT_PRIORITY)
        for request, url, priority in pipe.execute()
    ]


def _decoded(raw: Any) -> Any:
    return None if raw is None else json.loads(raw)


def _enqueue_one(body: OneJobRequest, key: str | None, tenant: str) -> tuple[JobRecord, bool]:
    options = JobOptions(key, body.notify_url, body.provider, tenant, body.priority)
    job_id, created = enqueue_validated(body.payload(), options)
    if not created and _stored([job_id])[0] != body.enqueued_with():
        raise IdempotencyConflict([0], job_id)
    record = services().store.get(job_id)
    if record is None:  # the key outlived its job's record: it cannot be used again yet
        raise IdempotencyConflict([0], job_id)
    return record, created


#: The ``Idempotency-Key`` header of the enqueue routes.
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=MAX_IDEMPOTENCY_KEY_CHARS,
        description="Same as the request's `idempotency_key` (they must agree).",
    ),
]


@router.post(
    JOBS_ROUTE.removeprefix(API_PREFIX),
    status_code=202,
    response_model=JobRecord,
    summary="Enqueue a remix job",
    responses={
        200: {"model": JobRecord, "description": "the job this idempotency key already names"},
        **_errors(401, 409, 413, 429, 503),
    },
)
async def create_job(
    body: OneJobRequest,
    response: Response,
    tenant: Tenant,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobRecord:
    key = _one_key(body.idempotency_key, idempotency_key)
    try:
        record, created = await run_in_threadpool(_enqueue_one, body, key, tenant)
    except IdempotencyConflict as exc:
        raise HTTPException(
            409, f"the idempotency key already names job {exc.owner} with another request"
        ) from None
    except QueueFull as exc:
        raise queue_full(exc) from None
    response.headers["Location"] = job_location(record.job_id)
    response.status_code = 202 if created else 200
    return record


def _header_text(raw: str | None) -> str | None:
    """A header as the client sent it: HTTP headers arrive as latin-1, clients send UTF-8.

    Without this, ``clé`` in the header and in the body would be two idempotency keys.
    """
    if raw is None:
        return None
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise _invalid(["header", "Idempotency-Key"], "must be UTF-8 text", None) from None


def _one_key(body_key: str | None, raw_header_key: str | None) -> str | None:
    header_key = _header_text(raw_header_key)
    if header_key is not None and not header_key.strip():
        raise _invalid(["header", "Idempotency-Key"], "must not be blank", header_key)
    if body_key is not None and header_key is not None and body_key != header_key:
        raise _invalid(
            ["header", "Idempotency-Key"], "differs from the body's idempotency_key", header_key
        )
    return body_key if body_key is not None else header_key


# ------------------------------------------------------------------ batch


def _check_batch(jobs: list[JobRequest]) -> None:
    """The check beyond each request's: one request per idempotency key."""
    errors: list[dict[str, Any]] = []
    first_with_key: dict[str, JobRequest] = {}
    for index, job in enumerate(jobs):
        key = job.idempotency_key
        if key is None:
            continue
        earlier = first_with_key.setdefault(key, job)
        if earlier is not job and earlier.enqueued_with() != job.enqueued_with():
            errors += _invalid(
                ["body", "jobs", index, "idempotency_key"],
                "an earlier request of the batch has this key and another body",
                key,
            ).errors()
    if errors:
        raise RequestValidationError(errors)


def _enqueue_batch(jobs: list[JobRequest], tenant: str) -> tuple[list[JobRecord], bool]:
    items = [
        (
            job.payload(),
            JobOptions(job.idempotency_key, job.notify_url, PROVIDER, tenant, job.priority),
        )
        for job in jobs
    ]

    def refuse_conflicts(owners: list[str | None]) -> None:
        known = [(i, owner) for i, owner in enumerate(owners) if owner is not None]
        stored = _stored([owner for _, owner in known])
        clashes = [
            i for (i, _), was in zip(known, stored, strict=True) if was != jobs[i].enqueued_with()
        ]
        if clashes:
            raise IdempotencyConflict(clashes)

    owners = enqueue_many_validated(items, check=refuse_conflicts)
    records = services().store.get_many([job_id for job_id, _ in owners])
    missing = [i for i, record in enumerate(records) if record is None]
    if missing:  # keys that outlived their jobs' records
        raise IdempotencyConflict(missing)
    return [r for r in records if r is not None], any(created for _, created in owners)


@router.post(
    BATCH_ROUTE.removeprefix(API_PREFIX),
    status_code=202,
    response_model=BatchResponse,
    summary="Enqueue up to 1,000 jobs at once: all of them or none",
    responses={
        200: {"model": BatchResponse, "description": "every idempotency key named a job"},
        **_errors(401, 409, 413, 429, 503),
    },
)
async def create_jobs(body: BatchRequest, response: Response, tenant: Tenant) -> BatchResponse:
    _check_batch(body.jobs)
    try:
        records, created = await run_in_threadpool(_enqueue_batch, body.jobs, tenant)
    except IdempotencyConflict as exc:
        where = ", ".join(map(str, exc.indexes[:20]))
        raise HTTPException(
            409, f"jobs {where}: the idempotency key already names a job with another request"
        ) from None
    except QueueFull as exc:
        raise queue_full(exc) from None
    response.status_code = 202 if created else 200
    return BatchResponse(jobs=records)


# ------------------------------------------------------------------ read, list, cancel

JobId = Annotated[str, Path(min_length=1, max_length=MAX_JOB_ID_CHARS)]


@router.get(
    "/jobs/{job_id}",
    response_model=JobRecord,
    summary="A job's record; with `wait`, once it has finished (a long poll)",
    responses=_errors(401, 404, 503),
)
async def read_job(
    request: Request,
    job_id: JobId,
    tenant: Tenant,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT_S,
            description="Hold the request until the job finishes or this many seconds pass.",
        ),
    ] = 0,
) -> JobRecord:
    if wait > 0:
        watch: FinishedWatch = request.app.state.finished_watch
        record = await wait_for_record(watch, job_id, wait, tenant)
    else:
        record = visible(await read_record(job_id), tenant)
    if record is None:
        raise HTTPException(404, "no such job")
    return record


@router.get(
    "/jobs",
    response_model=JobPage,
    summary="The caller's tenant's jobs in one state, oldest first, a page at a time",
    responses=_errors(401, 503),
)
async def list_jobs(
    state: Annotated[JobState, Query(description="Which state's jobs to list.")],
    tenant: Tenant,
    cursor: Annotated[
        str | None,
        Query(max_length=MAX_CURSOR_CHARS, description="`next_cursor` of the previous page."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
) -> JobPage:
    after = None if cursor is None else decode_cursor(cursor, state)
    records, position = await run_in_threadpool(
        lambda: services().store.list_by_state(state, limit, after, tenant=tenant)
    )
    next_cursor = None if position is None else encode_cursor(state, position)
    return JobPage(jobs=records, next_cursor=next_cursor)


def encode_cursor(state: JobState, position: tuple[float, str]) -> str:
    """An opaque cursor: the state and the last ``(created_at, job_id)`` of a page."""
    raw = json.dumps([state.value, position[0], position[1]], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str, state: JobState) -> tuple[float, str]:
    """The position a cursor names; ``422`` when it is not one of ours for ``state``."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        kind, created_at, job_id = json.loads(raw)
        valid = (
            kind == state.value
            and isinstance(created_at, int | float)
            and not isinstance(created_at, bool)
            and math.isfinite(created_at)
            and isinstance(job_id, str)
            and 0 < len(job_id) <= MAX_JOB_ID_CHARS
        )
    except (binascii.Error, ValueError, TypeError):
        valid = False
    if not valid:
        raise _invalid(["query", "cursor"], f"not a cursor of a page of {state.value} jobs", cursor)
    return float(created_at), job_id


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobRecord,
    summary="Cancel a job not yet accepted upstream",
    responses={
        **_errors(401, 404, 503),
        409: {"model": CancelRefused, "description": "too late: " + "; ".join(CANCEL_REFUSALS)},
    },
)
async def cancel(job_id: JobId, tenant: Tenant) -> JobRecord | JSONResponse:
    try:
        return await run_in_threadpool(lambda: cancel_job(job_id, tenant=tenant))
    except KeyError:
        raise HTTPException(404, "no such job") from None
    except JobNotCancellable as exc:
        refused = CancelRefused(detail=str(exc), reason=exc.reason)  # type: ignore[arg-type]
        return JSONResponse(refused.model_dump(), status_code=409)
