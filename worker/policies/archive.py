"""The archive policy: copy a succeeded job's result images to ``REMIX_ARCHIVE_URL``.

A step runs for the ``remix.archive`` message carrying the job's latest archive token
(see :mod:`worker.store.archive`). It downloads every URL of the record's
``result_urls`` and stores image ``n`` (counted from 0, in the order of ``result_urls``)
as ``<job_id>/<n>.<ext>`` (:mod:`worker.store.archive_files`), then records ``archived``
entries (location, bytes, sha256) and ``archive.state = done``. Any failure, any
exception included, makes the whole step a failed try: it is tried again after a backoff
with full jitter, until ``REMIX_ARCHIVE_MAX_ATTEMPTS`` tries were made, then
``archive.state = failed`` with the last error; a job id that cannot name a file fails
at once. The job's state and results never change: archiving is a copy. A step's
downloads share ``Settings.archive_step_s``, so it ends before the broker's visibility
timeout would deliver its message to another slot.

Only URLs the upstream returned are fetched. ``result_urls`` is written by the poll step
(from recordInfo) or by a callback only after its signature was verified
(:mod:`worker.policies.callbacks`); a URL a producer gave is never downloaded by a worker. Every
download, each redirect hop included, goes through the outbound guard
(:mod:`worker.net.outbound`): http(s) only, public addresses only unless
``REMIX_ARCHIVE_ALLOW_PRIVATE`` (a refusal fails the job's archiving at once), no proxy.
A download is bounded every way: a size cap
(``REMIX_ARCHIVE_MAX_BYTES``; nothing is read past it), an ``image/*`` content type
whose bytes really are a whole JPEG, PNG or WebP image (sniffed, then checked for
completeness: :func:`worker.images.is_complete_image`), connect and read timeouts, and a
total deadline (``REMIX_ARCHIVE_TIMEOUT_S``, enforced by cutting the socket,
:mod:`worker.net.deadline`; a body the deadline cut is never kept, even one that looks complete).
No URL is logged or stored in an error: a signed URL is a credential.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin

import requests

from worker.images import EXTENSIONS, is_complete_image, sniff_image_type
from worker.logs import job_context
from worker.models import Archive, ArchivedImage
from worker.net import deadline, outbound
from worker.policies.notify import describe_request_error
from worker.policies.retry import side_work_try
from worker.services import Services
from worker.settings import Settings
from worker.store.archive import ArchiveSchedule, ArchiveTarget, archive_schedule
from worker.store.archive_files import ArchiveError, ArchiveStore, archive_store, check_name

logger = logging.getLogger("worker.archive")

#: Longest wait for the connection, and for each read of the answer.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 20.0
#: Redirects followed per image (the guard checks each hop as it checks the first).
MAX_REDIRECTS = 5
USER_AGENT = "remixq-archive/1"
#: The error of a try made by a worker without ``REMIX_ARCHIVE_URL``.
NOT_HERE = "archiving is off on the worker that ran this try (REMIX_ARCHIVE_URL unset)"
#: The error of a job whose id cannot name files (``tenant/abc``, ``..``): never retried.
UNUSABLE_ID = "the job id cannot name an archive file (it holds '/' or '\\', or is '.' or '..')"


class FetchError(Exception):
    """A download that did not give an acceptable image; ``str()`` is one line, no URL.

    ``permanent``: no later try can succeed (the guard refused the URL or its address).
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str


def fetch_image(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    guard: outbound.Guard | None = None,
) -> Fetched:
    """Download one result image with every check of the module docstring (through
    ``guard``; by default, public addresses only)."""
    session = outbound.thread_session(guard or outbound.Guard())
    late = f"no answer within {timeout_s:g} s"
    with deadline.deadline(timeout_s) as limit:
        try:
            fetched = _fetch(session, url, max_bytes)
        except requests.RequestException as exc:
            raise FetchError(
                describe_request_error(exc, expired=limit.expired, total=timeout_s)
            ) from None
        except (outbound.Refused, outbound.BadURL) as exc:
            raise FetchError(str(exc), permanent=True) from None
        except (FetchError, outbound.OutboundError) as exc:
            if limit.expired:  # cut at the deadline: that is the error, not the bytes left
                raise FetchError(late) from None
            raise FetchError(str(exc)) from None
        limit.finish()
        # The deadline cut the socket: a body without a length then reads as complete
        # (the cut looks like the server closing), so its bytes are never kept.
        if limit.expired:
            raise FetchError(late)
        return fetched


def _fetch(session: requests.Session, url: str, max_bytes: int) -> Fetched:
    for _ in range(MAX_REDIRECTS + 1):
        response = session.get(
            url,
            headers={"User-Agent": USER_AGENT, "Accept": "image/*"},
            timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
            allow_redirects=False,
            stream=True,
        )
        with response:
            if response.is_redirect and response.headers.get("Location"):
                url = urljoin(url, response.headers["Location"])
                continue
            return _read_image(response, max_bytes)
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


def _read_image(response: requests.Response, max_bytes: int) -> Fetched:
    if response.status_code != 200:
        raise FetchError(f"HTTP {response.status_code}")
    declared = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if not declared.startswith("image/"):
        raise FetchError(f"content type {declared or 'missing'!r} is not image/*")
    data = outbound.read_capped(response, max_bytes)
    sniffed = sniff_image_type(data)
    if sniffed is None:
        raise FetchError("not a JPEG, PNG or WebP image (checked by content)")
    if not is_complete_image(data, sniffed):
        kind = EXTENSIONS[sniffed].upper()
        raise FetchError(f"not a whole {kind} image (cut short or malformed)")
    return Fetched(data, sniffed)


_stores: dict[tuple[str | None, str | None], ArchiveStore | None] = {}
_stores_lock = threading.Lock()


def store_for(settings: Settings) -> ArchiveStore | None:
    """The archive ``settings`` name, built once per process (a boto3 client is costly)."""
    key = (settings.remix_archive_url, settings.remix_archive_s3_endpoint_url)
    with _stores_lock:
        if key not in _stores:
            _stores[key] = archive_store(settings)
        return _stores[key]


# ------------------------------------------------------------------ the step


def archive_step(svc: Services, job_id: str, token: int) -> str:
    """One archiving try of a succeeded job; returns what happened (for logs and tests).

    ``done``, ``retry``, ``failed``; ``stale`` (a newer message owns the entry),
    ``missing`` (the record expired) or ``dropped`` (nothing pending to archive).
    """
    with job_context(job_id):
        return _archive_step(svc, job_id, token)


def _archive_step(svc: Services, job_id: str, token: int) -> str:
    schedule = archive_schedule(svc)
    target = schedule.target(job_id)
    if target is None:
        schedule.end(job_id, token, "dropped")
        return "missing"
    pending = target.record.archive
    if pending is None or pending.state != "pending":  # ended: whatever the token, no change
        schedule.end(job_id, token, "dropped")
        return "dropped"
    if target.token != token:
        return "stale"
    try:
        check_name(f"{job_id}/0.png")
    except ValueError:
        return _record(svc, schedule, target, token, error=UNUSABLE_ID, permanent=True)
    # Any error of the try itself is a failed try, never an exception that records nothing
    # (the entry would then be sent again after every lease, pending forever).
    try:
        store = store_for(svc.settings)
        archived = None if store is None else copy_images(svc.settings, store, target)
    except FetchError as exc:
        return _record(svc, schedule, target, token, error=str(exc), permanent=exc.permanent)
    except ArchiveError as exc:
        return _record(svc, schedule, target, token, error=str(exc))
    except Exception as exc:
        return _record(svc, schedule, target, token, error=unexpected(exc))
    if archived is None:  # a worker of a fleet set up unevenly: another may have the setting
        return _record(svc, schedule, target, token, error=NOT_HERE)
    return _record(svc, schedule, target, token, archived=archived)


def unexpected(exc: Exception) -> str:
    """One line for an error no check expected, without its message (it may hold a URL)."""
    logger.warning("archiving: unexpected %s", type(exc).__name__)
    return f"unexpected error ({type(exc).__name__})"


def copy_images(
    settings: Settings, store: ArchiveStore, target: ArchiveTarget
) -> list[ArchivedImage]:
    """Download every result image of the job and store it; raises on the first failure.

    The downloads share ``settings.archive_step_s`` (each still at most
    ``REMIX_ARCHIVE_TIMEOUT_S``), so the step ends before the broker's visibility timeout
    would hand its message to another slot.
    """
    record = target.record
    guard = outbound.Guard(allow_private=settings.remix_archive_allow_private)
    archived = []
    ends = time.monotonic() + settings.archive_step_s
    for n, url in enumerate(record.result_urls):
        try:
            left = ends - time.monotonic()
            if left <= 0:
                raise FetchError(f"no time left in this try ({settings.archive_step_s:g} s)")
            fetched = fetch_image(
                url,
                max_bytes=settings.remix_archive_max_bytes,
                timeout_s=min(settings.remix_archive_timeout_s, left),
                guard=guard,
            )
            name = f"{record.job_id}/{n}.{EXTENSIONS[fetched.content_type]}"
            location = store.put(name, fetched.data, fetched.content_type)
        except FetchError as exc:
            raise FetchError(f"image {n}: {exc}", permanent=exc.permanent) from None
        except ArchiveError as exc:
            raise ArchiveError(f"image {n}: {exc}") from None
        except Exception as exc:  # a malformed redirect (ValueError), a bug
            raise ArchiveError(f"image {n}: {unexpected(exc)}") from None
        archived.append(
            ArchivedImage(
                location=location,
                bytes=len(fetched.data),
                sha256=hashlib.sha256(fetched.data).hexdigest(),
                content_type=fetched.content_type,
                source_url=url,
            )
        )
    return archived


def _record(
    svc: Services,
    schedule: ArchiveSchedule,
    target: ArchiveTarget,
    token: int,
    *,
    error: str | None = None,
    archived: list[ArchivedImage] | None = None,
    permanent: bool = False,
) -> str:
    """Write the try's outcome and count it (``permanent``: an error no retry can mend)."""
    settings = svc.settings
    job_id = target.record.job_id
    attempts = (target.record.archive.attempts if target.record.archive else 0) + 1
    decided = side_work_try(
        attempts,
        failed=error is not None,
        permanent=permanent,
        most=settings.remix_archive_max_attempts,
        base=settings.remix_archive_retry_base_s,
        cap=settings.remix_archive_retry_max_s,
    )
    outcome, retry_in = decided.outcome, decided.retry_in
    if outcome == "done":
        note = Archive(state="done", attempts=attempts, archived_at=svc.clock.now())
    else:
        state = "pending" if outcome == "retry" else "failed"
        note = Archive(state=state, attempts=attempts, last_error=error)
    if schedule.end(job_id, token, outcome, note, archived, retry_in) != "ok":
        return "stale"
    svc.metrics.count(f"archive_total:{outcome}")
    _log(job_id, outcome, note, retry_in, settings.remix_archive_max_attempts, archived)
    return outcome


def _log(
    job_id: str,
    outcome: str,
    note: Archive,
    retry_in: float,
    most: int,
    archived: list[ArchivedImage] | None,
) -> None:
    if outcome == "done":
        logger.info(
            "job %s: %d result image(s) archived (try %d)",
            job_id,
            len(archived or []),
            note.attempts,
        )
    elif outcome == "retry":
        logger.warning(
            "job %s: archiving failed (%s), try %d of %d; next in %.1f s",
            job_id,
            note.last_error,
            note.attempts,
            most,
            retry_in,
        )
    else:
        logger.warning(
            "job %s: archiving given up after %d tries (%s)", job_id, note.attempts, note.last_error
        )
