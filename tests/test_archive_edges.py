"""Archiving's edges found by an adversarial review (real Redis db, the sandbox, raw servers).

Each test failed on commit 4b1a078 for the reason in its docstring: a truncated or fake
image stored as ``done``, an error nothing caught leaving archiving ``pending`` forever,
a second copy of a message undoing ``done``, a store URL with a NUL accepted at start.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from sandbox.server import SandboxServer
from tests.helpers import raw_http_server, wait_until, whole_png
from tests.policy_kit import make_services
from tests.test_policy_archive import ARCHIVE, claim, finished_job, record, step, succeeded_job
from worker import keys
from worker.fleet.dispatcher import LIVE_WORKER_S, Dispatcher, queues_without_workers
from worker.models import JobState
from worker.policies.archive import UNUSABLE_ID, archive_step
from worker.services import Services
from worker.store.archive import archive_schedule
from worker.tasks import is_usable_job_id, message_problem

pytestmark = pytest.mark.policy

PNG = whole_png(4000)


@pytest.fixture
def archive_dir(tmp_path: Path) -> Path:
    return tmp_path / "archive"


def services(upstream: SandboxServer, archive_dir: Path, **extra: Any) -> Services:
    return make_services(
        upstream.url, remix_archive_url=archive_dir.as_uri(), **{**ARCHIVE, **extra}
    )


def finished(svc: Services, result_urls: list[str], **create: Any) -> str:
    return finished_job(svc, JobState.SUCCEEDED, result_urls, **create)


# --------------------------------------------------------------------------- partial files


def test_a_slow_drip_cut_at_the_deadline_is_not_archived_as_done(
    policy_redis: redis.Redis, upstream: SandboxServer, archive_dir: Path
) -> None:
    """A close-delimited body (no Content-Length) dripped past REMIX_ARCHIVE_TIMEOUT_S:
    the reaper shuts the socket down, http.client reads that as the end of the body, and
    fetch_image never looks at ``limit.expired`` on success. The first bytes (a PNG
    signature) pass the sniff, so a truncated file is stored and archive.state = done."""

    def drip(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n")
        conn.sendall(PNG[:64])
        for byte in PNG[64:200]:
            time.sleep(0.05)
            conn.sendall(bytes([byte]))

    svc = services(upstream, archive_dir, remix_archive_timeout_s=1.0)
    with raw_http_server(drip) as base:
        job_id = finished(svc, [base + "/0.png"])
        outcome = step(svc, job_id)
    archive = record(svc, job_id).archive
    stored = list(archive_dir.rglob("*.png"))
    assert outcome == "retry", (outcome, archive, [p.stat().st_size for p in stored])
    assert archive is not None and archive.last_error == "image 0: no answer within 1 s"
    assert stored == []


def test_a_body_cut_mid_way_is_not_archived_as_done(
    policy_redis: redis.Redis, upstream: SandboxServer, archive_dir: Path
) -> None:
    """A CDN that drops the connection half-way through a close-delimited PNG: the half
    file has PNG magic bytes, so it is stored and reported done (sha256 of half an image).
    The README promises a body that is not a PNG image is a failed try."""
    half = PNG[: len(PNG) // 2]

    def cut(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n")
        conn.sendall(half)

    svc = services(upstream, archive_dir)
    with raw_http_server(cut) as base:
        job_id = finished(svc, [base + "/0.png"])
        outcome = step(svc, job_id)
    rec = record(svc, job_id)
    assert outcome != "done", (rec.archive, [(a.bytes, len(PNG)) for a in rec.archived])


# --------------------------------------------------------------------------- job ids


@pytest.mark.parametrize("job_id", ["tenant/abc", "..", "a\\b"])
def test_a_job_id_with_a_slash_or_dots_ends_its_archiving(
    policy_redis: redis.Redis, upstream: SandboxServer, archive_dir: Path, job_id: str
) -> None:
    """``remix.submit`` over the Celery protocol accepts any printable job_id without
    spaces (``tenant/abc``, ``..``, ``a\\b``); the job runs and succeeds. Its archive
    name fails ``_check_name`` with a ValueError that copy_images/archive_step do not
    catch: no try is ever recorded, the entry is resent after every lease forever,
    archive stays pending with 0 attempts, and the job's webhook never fires."""
    assert is_usable_job_id(job_id) and message_problem(job_id, 0, {}) is None
    svc = services(upstream, archive_dir)
    succeeded_job(svc, job_id=job_id)
    # Up to two tries, as two dispatcher rounds would give (the lease ran out in between).
    for _ in range(2):
        try:
            step(svc, job_id)
        except Exception as exc:  # what remix_archive logged as "unexpected error" and dropped
            print("archive step raised", type(exc).__name__, exc)
        if record(svc, job_id).archive.state != "pending":  # type: ignore[union-attr]
            break
        svc.store.redis.zadd(keys.ARCHIVE_SCHEDULE, {job_id: 0}, xx=True)
    archive = record(svc, job_id).archive
    assert archive is not None
    assert archive.attempts >= 1 and archive.last_error is not None, archive
    # No retry can mend the name: archiving ends at once, with a one-line reason.
    assert (archive.state, archive.attempts, archive.last_error) == ("failed", 1, UNUSABLE_ID)
    assert archive_schedule(svc).due(job_id) is None
    # Nothing escaped the archive directory either way.
    assert not (archive_dir.parent / "abc").exists()


# --------------------------------------------------------------------------- duplicates


def test_a_redelivered_copy_of_the_same_message_cannot_undo_done(
    policy_redis: redis.Redis, upstream: SandboxServer, archive_dir: Path
) -> None:
    """archive_end.lua only compared tokens and never retired the token it accepted, so two
    runs of one message (the broker redelivered an unacked task after its 120 s visibility
    timeout, while the lease allowed timeout_s + 60 s per image, i.e. 180+ s) both recorded.
    The copy that fails later turns a ``done`` archive (webhook already made due with
    ``done``) back into ``pending`` and, after the tries run out, ``failed``."""
    served: list[int] = []
    lock = threading.Lock()

    def answer(conn: socket.socket) -> None:
        with lock:
            served.append(1)
            n = len(served)
        if n == 1:  # the first run: a good image after a short wait
            time.sleep(0.5)
            head = (
                f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(PNG)}\r\n\r\n"
            )
            conn.sendall(head.encode() + PNG)
        else:  # the signed URL has expired by the time the copy asks
            time.sleep(1.5)
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    svc = services(upstream, archive_dir)
    # A server that answers two requests at once.
    with raw_http_server(answer, concurrent=True) as base:
        url = f"{base}/0.png?X-Amz-Signature=abc"
        job_id = finished(svc, [url], notify_url="http://127.0.0.1:9/hook")
        [item] = [d for d in claim(svc) if d.job_id == job_id]
        outcomes: list[str] = []
        first = threading.Thread(
            target=lambda: outcomes.append(archive_step(svc, job_id, item.token))
        )
        first.start()
        time.sleep(0.2)  # the redelivered copy starts while the first still runs
        outcomes.append(archive_step(svc, job_id, item.token))
        first.join()
    archive = record(svc, job_id).archive
    assert archive is not None
    assert sorted(outcomes).count("done") == 1, outcomes
    # Once done (and the webhook made due with it), nothing may take it back.
    assert archive.state == "done", (outcomes, archive)


# --------------------------------------------------------------------------- other errors


def test_a_broken_redirect_from_the_result_host_ends_archiving(
    policy_redis: redis.Redis, upstream: SandboxServer, archive_dir: Path
) -> None:
    """The result host answers 302 with ``Location: http://[::1`` (a malformed URL):
    ``urljoin`` raises ValueError, which is neither a FetchError nor a RequestException;
    the step recorded nothing, archive stayed pending with 0 attempts, forever."""

    def bad_redirect(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://[::1\r\nContent-Length: 0\r\n\r\n")

    svc = services(upstream, archive_dir)
    with raw_http_server(bad_redirect) as base:
        job_id = finished(svc, [base + "/0.png"])
        try:
            outcome = step(svc, job_id)
        except Exception as exc:
            outcome = f"raised {type(exc).__name__}: {exc}"
    archive = record(svc, job_id).archive
    assert outcome == "retry", (outcome, archive)
    assert archive is not None and archive.last_error == "image 0: unexpected error (ValueError)"


def test_an_archive_url_with_a_nul_byte_is_refused_at_start(
    policy_redis: redis.Redis, upstream: SandboxServer, tmp_path: Path
) -> None:
    """``REMIX_ARCHIVE_URL=file:///tmp/x%00y`` passes check_archive_url (the README: anything
    else stops the process at start); every step then dies on ``embedded null byte``
    (a ValueError, not OSError/ArchiveError), so no archive ever ends."""
    from worker.settings import ConfigurationError, load_settings

    url = tmp_path.as_uri() + "/arch%00ive"
    try:
        load_settings(remix_archive_url=url)
    except ConfigurationError:
        return  # refused at start: fine
    svc = make_services(upstream.url, remix_archive_url=url, **ARCHIVE)
    job_id = succeeded_job(svc)
    try:
        outcome = step(svc, job_id)
    except Exception as exc:
        outcome = f"raised {type(exc).__name__}: {exc}"
    pytest.fail(
        f"accepted {url!r}; a step then gives {outcome!r}, archive {record(svc, job_id).archive}"
    )


def test_html_behind_a_png_signature_is_not_archived_as_an_image(
    policy_redis: redis.Redis, upstream: SandboxServer, archive_dir: Path
) -> None:
    """The "checked by content" sniff reads only the first 8 bytes: an expired-link HTML
    page behind a PNG signature (Content-Length honest, status 200, image/png) is
    stored as ``0.png`` and reported done."""
    body = b"\x89PNG\r\n\x1a\n<html><body>This link has expired</body></html>"

    def answer(conn: socket.socket) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
        conn.sendall(head.encode() + body)

    svc = services(upstream, archive_dir)
    with raw_http_server(answer) as base:
        job_id = finished(svc, [base + "/0.png"])
        outcome = step(svc, job_id)
    stored = [p.read_bytes() for p in archive_dir.rglob("*.png")]
    assert outcome != "done", (outcome, stored)


# --------------------------------------------------------------------------- slots


def test_archive_steps_and_webhooks_together_hold_at_most_half_the_fleet(
    policy_redis: redis.Redis, upstream: SandboxServer, archive_dir: Path
) -> None:
    """Archive steps in flight count in the webhooks' fleet-wide limit (half the slots,
    at least one), so slow result hosts never hold every slot; an outcome frees one."""
    svc = services(upstream, archive_dir)
    jobs = [finished(svc, [f"{upstream.url}/files/none/{n}.png"]) for n in range(3)]
    schedule = archive_schedule(svc)
    first = schedule.claim(10, svc.settings, fleet_slots=4)
    assert len(first) == 2  # half of 4
    assert schedule.claim(10, svc.settings, fleet_slots=4) == []
    # A webhook in flight counts too: with one archive step ended, still none may start.
    svc.store.redis.zadd(keys.NOTIFY_IN_FLIGHT, {"some-job": time.time() + 60})
    assert archive_step(svc, first[0].job_id, first[0].token) == "retry"
    time.sleep(0.3)  # past the retry's backoff and the held entry's pause
    assert schedule.claim(10, svc.settings, fleet_slots=4) == []
    svc.store.redis.zrem(keys.NOTIFY_IN_FLIGHT, "some-job")
    later = wait_until(lambda: schedule.claim(10, svc.settings, fleet_slots=4), 5, interval=0.05)
    assert len(later) == 1 and {d.job_id for d in first + later} <= set(jobs)


def test_an_outcome_retires_its_token_and_an_ended_archive_never_changes(
    policy_redis: redis.Redis, upstream: SandboxServer, archive_dir: Path
) -> None:
    svc = services(upstream, archive_dir)
    job_id = succeeded_job(svc)
    [item] = [d for d in claim(svc) if d.job_id == job_id]
    assert archive_step(svc, job_id, item.token) == "done"
    assert archive_step(svc, job_id, item.token) == "dropped"  # a second copy of the message
    schedule = archive_schedule(svc)
    token = schedule.target(job_id).token  # type: ignore[union-attr]
    assert schedule.end(job_id, token, "retry", record(svc, job_id).archive) == "stale"
    assert record(svc, job_id).archive.state == "done"  # type: ignore[union-attr]


# --------------------------------------------------------------------------- queues


def test_a_queue_no_live_worker_consumes_is_reported(
    policy_redis: redis.Redis,
    upstream: SandboxServer,
    archive_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A fleet split as ``-Q submit,poll`` and ``-Q notify`` leaves ``archive`` without a
    consumer: ``remixq status`` names it, and each worker warns while messages wait."""
    svc = services(upstream, archive_dir)
    jobs = Dispatcher(svc, slots=2, queues=["submit", "poll"])
    hooks = Dispatcher(svc, slots=1, queues=["notify"])
    for dispatcher in (jobs, hooks):
        dispatcher.heartbeat()
    assert queues_without_workers(svc) == ["archive"]
    assert hooks.fleet_queues == {"submit", "poll", "notify"}
    hooks._started -= LIVE_WORKER_S  # every live worker has had time for a heartbeat
    with caplog.at_level(logging.WARNING, logger="worker.dispatcher"):
        hooks.warn_unconsumed({"archive": 0.0, "notify": 0.0})
        hooks.warn_unconsumed({"archive": 0.0})  # once, not every round
    warned = [r.getMessage() for r in caplog.records if "no live worker" in r.getMessage()]
    assert len(warned) == 1 and "queue archive" in warned[0]
    archiver = Dispatcher(svc, slots=1, queues=["notify", "archive"])
    archiver.heartbeat()
    assert queues_without_workers(svc) == []
    archiver.leave()  # a clean shutdown leaves the fleet at once
    assert queues_without_workers(svc) == ["archive"]
