"""``POST /v1/jobs:upload``: a remix job whose source images are files, sent as a form.

``POST /v1/jobs`` takes JSON and URLs only: file bytes in JSON would be base64 (a third
larger) and would share that route's small body cap. Here a ``multipart/form-data`` body
carries a ``request`` part (the JSON object ``POST /v1/jobs`` takes, plus ``provider``),
an ``image_file`` part and repeatable ``reference_image_file`` parts, under a cap of its
own (:data:`producers.http.guard.UPLOAD_BODY_MAX`). Files are checked by content like the
Python API's (:func:`producers.api.enqueue_request` does the rest: validate, store the
blobs, enqueue); a path is never read from a body. The ``request`` part may carry
``priority``; the tenant is the bearer token's, as on every jobs route.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import HTTPException
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from producers.api import FileBlobs, enqueue_request, file_blob
from producers.http.guard import API_PREFIX, UPLOAD_BODY_MAX, UPLOAD_ROUTE, job_location
from producers.http.jobs import (
    TENANT_FROM_TOKEN,
    IdempotencyKeyHeader,
    Stored,
    Tenant,
    _errors,
    _invalid,
    _one_key,
    _stored,
    bearer,
    queue_full,
)
from worker.app import services
from worker.fields import DEFAULT_PRIORITY, check_priority
from worker.models import (
    MAX_REFERENCE_FILES,
    PROVIDER,
    InvalidRequestError,
    JobRecord,
    refuse_file_fields,
    validate_request,
)
from worker.store.blobs import BlobStoreError, BlobStoreFull
from worker.store.jobs import QueueFull

router = APIRouter(prefix=API_PREFIX, tags=["jobs"], dependencies=[Depends(bearer)])

#: Reference files one request may carry.
#: Text parts read before the form is refused (one is used; the others are named in a 422).
MAX_FIELDS = 16
#: The parts of the form: ``request``, ``image_file``, ``reference_image_file``.
REQUEST_PART, IMAGE_PART, REFERENCE_PART = "request", "image_file", "reference_image_file"
JOB_OPTIONS = ("idempotency_key", "notify_url", "provider", "priority", "tenant")
FORM_SCHEMA = {
    "type": "object",
    "required": [REQUEST_PART],
    "properties": {
        REQUEST_PART: {
            "type": "string",
            "description": "JSON object: the fields of POST /v1/jobs (image_url optional "
            "when image_file is given; `priority` too), plus `provider` (default kie).",
        },
        IMAGE_PART: {"type": "string", "format": "binary", "description": "JPEG, PNG or WebP"},
        REFERENCE_PART: {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "Reference images as files (after any reference_image_urls).",
        },
    },
}


class UploadedJob:
    """The form, read and checked: the request's fields, its options, its files."""

    def __init__(self, fields: dict[str, Any], blobs: FileBlobs) -> None:
        #: The options given (a ``null`` one too: as in a JSON body, it is refused).
        self.given = {name for name in JOB_OPTIONS if name in fields}
        self.options = {name: fields.pop(name, None) for name in JOB_OPTIONS}
        self.fields = fields
        self.blobs = blobs

    @property
    def provider(self) -> str:
        value = self.options["provider"]
        if value is None:
            return PROVIDER
        if not isinstance(value, str):
            raise _invalid(["body", REQUEST_PART, "provider"], "must be a string")
        return value

    @property
    def priority(self) -> str:
        value = self.options["priority"]
        if "priority" not in self.given:
            return DEFAULT_PRIORITY
        try:
            return check_priority(value)
        except ValueError as exc:
            message = str(exc).removeprefix("priority: ")
            raise _invalid(["body", REQUEST_PART, "priority"], message) from None

    def refuse_tenant(self) -> None:
        if "tenant" in self.given:
            raise _invalid(["body", REQUEST_PART, "tenant"], TENANT_FROM_TOKEN)


async def _read_form(request: Request) -> UploadedJob:
    try:
        form = await request.form(max_files=1 + MAX_REFERENCE_FILES, max_fields=MAX_FIELDS)
    except StarletteHTTPException as exc:  # Starlette's answer to a body it cannot read as a form
        raise _invalid(["body"], f"not a readable multipart/form-data body: {exc.detail}") from None
    unknown = sorted(set(form.keys()) - {REQUEST_PART, IMAGE_PART, REFERENCE_PART})
    if unknown:
        raise _invalid(["body", unknown[0]], "is not a known part of the form")
    fields = _request_fields(form.getlist(REQUEST_PART))
    images = form.getlist(IMAGE_PART)
    references = form.getlist(REFERENCE_PART)
    if len(images) > 1:
        raise _invalid(["body", IMAGE_PART], "give at most one image_file")
    main = await _blob(images[0], IMAGE_PART) if images else None
    refs = [await _blob(part, f"{REFERENCE_PART}[{n}]") for n, part in enumerate(references)]
    return UploadedJob(fields, FileBlobs(main, refs))


def _request_fields(parts: list[Any]) -> dict[str, Any]:
    if len(parts) != 1 or not isinstance(parts[0], str):
        raise _invalid(["body", REQUEST_PART], "give one request part: a JSON object")
    try:
        fields = json.loads(parts[0])
    except (ValueError, RecursionError):
        raise _invalid(["body", REQUEST_PART], "is not valid JSON") from None
    if not isinstance(fields, dict):
        raise _invalid(["body", REQUEST_PART], "must be a JSON object")
    try:
        refuse_file_fields(fields, "the image_file and reference_image_file parts")
    except InvalidRequestError as exc:
        raise _invalid(["body", REQUEST_PART], str(exc)) from None
    return fields


async def _blob(part: Any, field: str) -> Any:
    if not isinstance(part, UploadFile):
        raise _invalid(["body", field], "must be a file part")
    data = await part.read()
    try:
        return file_blob(data, field, part.filename)
    except InvalidRequestError as exc:
        message = str(exc).removeprefix(f"invalid request: {field}: ")
        raise _invalid(["body", field], message) from None


def _enqueue(job: UploadedJob, key: str | None, tenant: str) -> tuple[JobRecord, bool]:
    """Enqueue; a repeat of the key must carry the same request and the same files."""
    key = key if key is not None else job.options["idempotency_key"]
    notify, priority = job.options["notify_url"], job.priority
    job_id, created = enqueue_request(
        job.fields,
        job.blobs,
        key,
        notify,
        provider=job.provider,
        tenant=tenant,
        priority=priority,
    )
    record = services().store.get(job_id)
    if not created:
        ours = validate_request({**job.fields, **job.blobs.fields()}, job.provider).stored()
        stored = _stored([job_id])[0]
        theirs = Stored(_sans_ids(stored.request), stored.notify_url, stored.priority)
        if record is None or theirs != Stored(_sans_ids(ours), notify, priority):
            raise HTTPException(
                409, f"the idempotency key already names job {job_id} with another request"
            )
    assert record is not None
    return record, created


def _sans_ids(request: Any) -> Any:
    """A stored request without its blob ids (a repeat's files get new ones)."""
    if not isinstance(request, dict):
        return request
    plain = dict(request)
    if isinstance(plain.get("image_file"), dict):
        plain["image_file"] = {k: v for k, v in plain["image_file"].items() if k != "blob"}
    if isinstance(plain.get("reference_image_files"), list):
        plain["reference_image_files"] = [
            {k: v for k, v in ref.items() if k != "blob"} if isinstance(ref, dict) else ref
            for ref in plain["reference_image_files"]
        ]
    return plain


@router.post(
    UPLOAD_ROUTE.removeprefix(API_PREFIX),
    status_code=202,
    response_model=JobRecord,
    summary="Enqueue a remix job with its source images as files (multipart)",
    description=f"The body is at most {UPLOAD_BODY_MAX} bytes; each image at most 10 MB, "
    "JPEG, PNG or WebP by content.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": FORM_SCHEMA}},
        }
    },
    responses={
        200: {"model": JobRecord, "description": "the job this idempotency key already names"},
        **_errors(401, 409, 413, 429, 503),
    },
)
async def upload_job(
    request: Request,
    response: Response,
    tenant: Tenant,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobRecord:
    job = await _read_form(request)
    job.refuse_tenant()
    key = _one_key(job.options["idempotency_key"], idempotency_key)
    try:
        record, created = await run_in_threadpool(_enqueue, job, key, tenant)
    except InvalidRequestError as exc:
        raise _invalid(["body", REQUEST_PART], str(exc)) from None
    except (BlobStoreFull, BlobStoreError) as exc:
        raise HTTPException(503, str(exc)) from None
    except QueueFull as exc:
        raise queue_full(exc) from None
    response.headers["Location"] = job_location(record.job_id)
    response.status_code = 202 if created else 200
    return record
