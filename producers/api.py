"""The Python API other services use: ``enqueue_remix``, ``get_job``, ``wait_for_job``.

A request is validated completely before anything is written or enqueued; bad input
raises :class:`~worker.models.InvalidRequestError`, a ``ValueError`` whose message is one
line naming every bad field.

Source images given as files are read and checked here, in the producer, then stored in
the blob store (:mod:`worker.store.blobs`) only once the whole request is valid; the job's
request, and so its Celery message, carries references to them, never the bytes.

Enqueueing is one atomic write: the job's record, its request and its place in the
schedule. From then on the job *will* be sent, by the schedule if by nothing else; the
``remix.submit`` message published right after is only the fast path. So
``enqueue_remix`` either returns (the job is durably queued) or raises with nothing
written. (If Redis accepted the write but its answer was lost, the call raises although
the job exists: the same ``idempotency_key`` on the retry finds it.)

Every job belongs to a ``tenant`` (a trusted caller names it; default ``default``) and
has a ``priority`` (``interactive``, ``normal``, ``bulk``); a tenant's idempotency keys
are its own, and with ``REMIX_TENANT_MAX_WAITING`` set a tenant with that many jobs not
yet sent gets :class:`~worker.store.jobs.QueueFull` (docs/tenants.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.app import services
from worker.fields import DEFAULT_PRIORITY, DEFAULT_TENANT, BlobRef, check_priority, check_tenant
from worker.images import load_image
from worker.logs import job_fields
from worker.models import PROVIDER, InvalidRequestError, JobRecord, validate_request
from worker.net import outbound
from worker.policies import cancelling
from worker.store.blobs import new_ref
from worker.store.jobs import NewJob, QueueFull
from worker.store.lines import backstop_s

logger = logging.getLogger("producers")

#: wait_for_job's first and longest pause between reads of the record.
WAIT_POLL_INITIAL_S = 0.2
WAIT_POLL_MAX_S = 2.0
MAX_IDEMPOTENCY_KEY_CHARS = 200


class JobNotCancellable(Exception):
    """The job cannot be cancelled: it was accepted upstream, is being sent, its last
    createTask's outcome is unknown, or it already finished otherwise. ``reason`` names
    which (``accepted``, ``sending``, ``unknown_outcome``, ``finished``)."""

    def __init__(self, job_id: str, reason: str) -> None:
        self.job_id = job_id
        self.reason = reason
        super().__init__(f"job {job_id} cannot be cancelled: {CANCEL_REFUSALS[reason]}")


CANCEL_REFUSALS = {
    "accepted": "it was already accepted upstream (and is paid for)",
    "sending": "its createTask request is under way",
    "unknown_outcome": "a createTask request's outcome is unknown (the upstream may have it)",
    "finished": "it already finished",
}


ImageSource = str | os.PathLike[str] | bytes


def enqueue_remix(
    prompt: str,
    image_url: str | None = None,
    reference_image_urls: list[str] | None = None,
    idempotency_key: str | None = None,
    notify_url: str | None = None,
    *,
    provider: str = PROVIDER,
    image_file: ImageSource | None = None,
    reference_image_files: Sequence[ImageSource] | None = None,
    tenant: str = DEFAULT_TENANT,
    priority: str = DEFAULT_PRIORITY,
    **other_input_fields: Any,
) -> str:
    """Validate a remix request and enqueue it; returns the job id.

    Parameters:
        prompt: the prompt.
        image_url, reference_image_urls: the source image and the references, as URLs.
        provider: the upstream: ``kie`` (default) or ``ideogram-remix`` (the legacy remix
            relay, which takes the source image as ``image_file`` only).
        tenant: who the job is for (``[A-Za-z0-9_.-]{1,64}``); its idempotency keys, its
            share of the key's budget and its limit of waiting jobs are its own.
        priority: ``interactive``, ``normal`` or ``bulk``: between classes the key's send
            moments go strictly to the higher one.
        idempotency_key: the same key (of the same tenant) returns the same job id and
            enqueues nothing new.
        notify_url: an http(s) URL the finished job's record is POSTed to (signed with
            ``REMIX_NOTIFY_HMAC_KEY``), at least once, tried up to
            ``REMIX_NOTIFY_MAX_ATTEMPTS`` times; the record's ``notification`` says how it went.
        image_file, reference_image_files: source images as files: a path (read here,
            in this process) or the bytes. JPEG, PNG or WebP by content, at most 10 MB
            each. For kie, exactly one of ``image_url``/``image_file`` and at least one
            reference in all. The bytes go to the blob store (``REMIX_BLOB_URL``), never
            into a Celery message.
        other_input_fields: any optional input field (``strength=0.5``, ``num_images="2"`` ...).

    Raises :class:`~worker.models.InvalidRequestError` (a ``ValueError``) for bad input and
    :class:`~worker.store.jobs.QueueFull` when the tenant has as many jobs waiting as
    ``REMIX_TENANT_MAX_WAITING`` allows; either way nothing is written.
    """
    check_job_options(tenant, priority)
    blobs = _load_files(image_file, reference_image_files)
    data: dict[str, Any] = {"prompt": prompt, **other_input_fields}
    for name, value in (("image_url", image_url), ("reference_image_urls", reference_image_urls)):
        if value is not None:
            data[name] = value
    return enqueue_request(
        data,
        blobs,
        idempotency_key,
        notify_url,
        provider=provider,
        tenant=tenant,
        priority=priority,
    )[0]


def check_job_options(tenant: Any, priority: Any) -> None:
    """A tenant name and a priority, or :class:`InvalidRequestError` (one line)."""
    try:
        check_tenant(tenant)
        check_priority(priority)
    except ValueError as exc:
        raise InvalidRequestError(f"invalid request: {exc}") from None


@dataclass(frozen=True)
class JobOptions:
    """What a job has besides its request (all checked before they get here)."""

    idempotency_key: str | None = None
    notify_url: str | None = None
    provider: str = PROVIDER
    tenant: str = DEFAULT_TENANT
    priority: str = DEFAULT_PRIORITY
    #: The job this one replays (``remixq retry``).
    retry_of: str | None = None


def _load_files(
    image_file: ImageSource | None, reference_image_files: Sequence[ImageSource] | None
) -> FileBlobs:
    """Read and check the files (one-line errors); nothing is stored yet."""
    if isinstance(reference_image_files, str | bytes | os.PathLike):
        raise InvalidRequestError(
            "invalid request: reference_image_files: must be a list of file paths or bytes"
        )
    main = None if image_file is None else file_blob(image_file, "image_file")
    refs = [
        file_blob(source, f"reference_image_files[{index}]")
        for index, source in enumerate(reference_image_files or [])
    ]
    return FileBlobs(main, refs)


def file_blob(source: ImageSource, field: str, name: str | None = None) -> tuple[BlobRef, bytes]:
    """One source image read and checked (one-line errors), with its reference."""
    data, content_type, file_name = load_image(source, field, name)
    return new_ref(data, content_type, file_name), data


@dataclass(frozen=True)
class FileBlobs:
    """Source images read and checked, with their references, not stored yet."""

    image: tuple[BlobRef, bytes] | None = None
    references: list[tuple[BlobRef, bytes]] = field(default_factory=list)

    @property
    def all(self) -> list[tuple[BlobRef, bytes]]:
        return [*([self.image] if self.image else []), *self.references]

    def fields(self) -> dict[str, Any]:
        """The request fields naming the files (blob references, never bytes)."""
        found: dict[str, Any] = {}
        if self.image is not None:
            found["image_file"] = self.image[0].model_dump()
        if self.references:
            found["reference_image_files"] = [ref.model_dump() for ref, _ in self.references]
        return found


def enqueue_request(
    data: dict[str, Any],
    blobs: FileBlobs,
    idempotency_key: str | None,
    notify_url: str | None,
    *,
    provider: str = PROVIDER,
    tenant: str = DEFAULT_TENANT,
    priority: str = DEFAULT_PRIORITY,
) -> tuple[str, bool]:
    """Validate everything, then store the files, then enqueue (the HTTP app's path too).

    Returns ``(job_id, created)``, as :func:`enqueue_validated` does.

    An idempotent repeat that finds its job stores nothing; when a concurrent producer
    wins the key between the check and the write, or the tenant's waiting jobs are at
    their limit (:class:`QueueFull`), the files just stored are deleted.
    """
    request = validate_request({**data, **blobs.fields()}, provider=provider)
    check_idempotency_key(idempotency_key)
    check_job_options(tenant, priority)
    svc = services()
    check_notify_url(notify_url, allow_private=svc.settings.remix_notify_allow_private)
    if blobs.all and idempotency_key is not None:
        owner = svc.store.idempotency_owner(idempotency_key, tenant)
        if owner is not None:
            return owner, False
    svc.blobs.store(blobs.all)
    options = JobOptions(idempotency_key, notify_url, provider, tenant, priority)
    try:
        job_id, created = enqueue_validated(request.stored(), options)
    except QueueFull:
        _delete_blobs(blobs)
        raise
    if not created:
        _delete_blobs(blobs)
    return job_id, created


def _delete_blobs(blobs: FileBlobs) -> None:
    if blobs.all:
        with contextlib.suppress(Exception):
            services().blobs.delete(ref for ref, _ in blobs.all)


def enqueue_validated(payload: dict[str, Any], job: JobOptions) -> tuple[str, bool]:
    """Enqueue a request already validated for ``job.provider``; returns ``(job_id,
    created)``. Raises :class:`QueueFull` when the tenant may not have one more job
    waiting."""
    svc = services()
    job_id, created = svc.store.create(
        uuid.uuid4().hex,
        payload,
        due_in=backstop_s(svc.settings),
        idempotency_key=job.idempotency_key,
        notify_url=job.notify_url,
        retry_of=job.retry_of,
        provider=job.provider,
        tenant=job.tenant,
        priority=job.priority,
    )
    if created:
        _log_queued(job_id, job.retry_of)
        svc.publisher.announce([(job_id, payload)])
    return job_id, created


def _log_queued(job_id: str, retry_of: str | None = None) -> None:
    """The one line of a job's first state, ``queued`` (the others are the worker's)."""
    replay = f" (a retry of {retry_of})" if retry_of else ""
    logger.info("job %s queued%s", job_id, replay, extra=job_fields(job_id, state="queued"))


def enqueue_many_validated(
    jobs: Sequence[tuple[dict[str, Any], JobOptions]],
    check: Callable[[list[str | None]], None] | None = None,
) -> list[tuple[str, bool]]:
    """Enqueue requests already validated, all in one transaction (all of them or none).

    ``jobs``: ``(payload, options)`` each (kie.ai requests). ``check`` is called with, for
    each job, the id of the job its idempotency key already names (or None) and may raise
    to enqueue nothing. Returns ``(job_id, created)`` for each job, in order. Raises
    :class:`QueueFull` (nothing enqueued) when a tenant may not have them all waiting.
    """
    svc = services()
    new = [
        NewJob(
            uuid.uuid4().hex,
            payload,
            job.idempotency_key,
            job.notify_url,
            tenant=job.tenant,
            priority=job.priority,
        )
        for payload, job in jobs
    ]
    owners = svc.store.create_many(new, due_in=backstop_s(svc.settings), check=check)
    created = [job for job, (_, fresh) in zip(new, owners, strict=True) if fresh]
    for job in created:
        _log_queued(job.job_id)
    svc.publisher.announce([(job.job_id, job.request) for job in created])
    return owners


def cancel_job(job_id: str, *, tenant: str | None = None) -> JobRecord:
    """Cancel a job that was not sent upstream; returns its ``cancelled`` record.

    Raises ``KeyError`` when there is no such job (or, with ``tenant``, it is another
    tenant's) and :class:`JobNotCancellable` when it was accepted upstream, is being sent,
    has a createTask of unknown outcome, or finished otherwise. Cancelling a cancelled job
    again returns its record.
    """
    svc = services()
    if tenant is not None:
        record = svc.store.get(job_id)
        if record is None or record.tenant != tenant:
            raise KeyError(f"no job {job_id!r}")
    outcome = cancelling.cancel(svc, job_id)
    if outcome == "missing":
        raise KeyError(f"no job {job_id!r}")
    if outcome not in ("cancelled", "already"):
        raise JobNotCancellable(job_id, outcome)
    record = svc.store.get(job_id)
    if record is None:
        raise KeyError(f"no job {job_id!r}")
    if outcome == "cancelled":
        logger.info("job %s cancelled", job_id, extra=job_fields(job_id, state="cancelled"))
        with contextlib.suppress(Exception):
            svc.results.store(record)
    return record


#: The longest ``notify_url`` a job may name.
MAX_NOTIFY_URL_CHARS = 2000


def check_notify_url(url: str | None, *, allow_private: bool) -> None:
    """A completion webhook URL must be http(s) and, unless allowed, not private.

    Only the URL as written: a host name is resolved, and its addresses checked, before
    each delivery (:mod:`worker.net.outbound`).
    """
    if url is None:
        return
    try:
        outbound.check_url(url, allow_private=allow_private, max_chars=MAX_NOTIFY_URL_CHARS)
    except outbound.Refused as exc:
        raise InvalidRequestError(
            f"invalid request: notify_url: {exc} (a private, loopback or reserved one; "
            "set REMIX_NOTIFY_ALLOW_PRIVATE=1 to allow)"
        ) from None
    except outbound.OutboundError as exc:
        raise InvalidRequestError(f"invalid request: notify_url: {exc}") from None


def check_idempotency_key(key: str | None) -> None:
    if key is None:
        return
    if not isinstance(key, str) or not key.strip() or len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidRequestError(
            f"invalid request: idempotency_key must be a non-empty string of at most "
            f"{MAX_IDEMPOTENCY_KEY_CHARS} characters"
        )


def get_job(job_id: str) -> JobRecord | None:
    """The job's record, or None when there is no such job (or it expired)."""
    return services().store.get(job_id)


def wait_for_job(job_id: str, timeout: float = 60) -> JobRecord:
    """Block until the job finishes; raises ``TimeoutError`` after ``timeout`` seconds.

    Raises ``KeyError`` when there is no such job.
    """
    deadline = time.monotonic() + timeout
    pause = WAIT_POLL_INITIAL_S
    while True:
        record = get_job(job_id)
        if record is None:
            raise KeyError(f"no job {job_id!r}")
        if record.finished:
            return record
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"job {job_id} still {record.state.value} after {timeout:g}s")
        time.sleep(min(pause, remaining))
        pause = min(pause * 1.5, WAIT_POLL_MAX_S)
