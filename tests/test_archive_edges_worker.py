"""Archiving's edges found by an adversarial review, with real ``celery -A worker.app worker``
processes.

Each test failed on commit 4b1a078 for the reason in its docstring (the last one held).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from producers import enqueue_remix, get_job, wait_for_job
from producers.fleet import fleet_status
from sandbox.launch import ManagedProcess
from tests.conftest import REMIX_INPUT, StartWorkers, unique_prompt
from tests.helpers import raw_http_server, wait_until, whole_png
from worker import keys
from worker.app import app, services
from worker.models import Archive, JobState
from worker.store.jobs import JobStore

pytestmark = pytest.mark.integration


def test_a_foreign_job_id_with_a_slash_never_ends_its_archiving(
    sandbox: ManagedProcess, start_workers: StartWorkers, tmp_path: Path
) -> None:
    """A producer speaking the Celery protocol sends ``remix.submit`` with job_id
    ``tenant/<id>`` (accepted: printable, no spaces). The job succeeds, but every archive
    step dies on ``_check_name``'s ValueError, which remix_archive logs as an unexpected
    error and drops without recording a try: archive stays ``pending`` with 0 attempts,
    is resent after each lease forever, never reaches done/failed, and the job's
    completion webhook (which waits for archiving to end) can never fire."""
    [worker] = start_workers(
        REMIX_ARCHIVE_URL=(tmp_path / "archive").as_uri(),
        REMIX_ARCHIVE_ALLOW_PRIVATE="1",
        REMIX_ARCHIVE_TIMEOUT_S="5",
        REMIX_ARCHIVE_MAX_ATTEMPTS="2",
        REMIX_ARCHIVE_RETRY_BASE_S="0.2",
        REMIX_ARCHIVE_RETRY_MAX_S="0.5",
    )
    job_id = f"tenant/{uuid.uuid4().hex[:12]}"
    request = {"prompt": unique_prompt("attack-slash"), **REMIX_INPUT, "num_images": 1}
    app.send_task("remix.submit", kwargs={"request": request, "job_id": job_id}, queue="submit")
    record = wait_for_job(wait_until(lambda: get_job(job_id), 10).job_id, timeout=60)
    assert record.state is JobState.SUCCEEDED and record.job_id == job_id

    def ended() -> bool:
        found = get_job(job_id)
        return bool(found and found.archive and found.archive.state != "pending")

    with contextlib.suppress(Exception):
        wait_until(ended, 25, interval=0.5)
    final = get_job(job_id)
    log = worker.log_path.read_text() if worker.log_path else ""
    assert final is not None and final.archive is not None
    assert final.archive.state in ("done", "failed"), (
        final.archive,
        [line for line in log.splitlines() if "archive" in line.lower()][-5:],
    )


@pytest.fixture
def slow_cdn() -> Iterator[tuple[str, list[int]]]:
    """A result-image host that answers every request slowly (1 byte/s, Content-Length
    honest), each connection in its own thread; yields its base URL and the live count."""
    stop = threading.Event()
    live = [0]
    lock = threading.Lock()

    def handle(conn: socket.socket) -> None:
        with lock:
            live[0] += 1
        try:
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
                b"\x89PNG\r\n\x1a\n"
            )
            while not stop.is_set():
                time.sleep(1)
                conn.sendall(b"\x00")
        finally:
            with lock:
                live[0] -= 1

    with raw_http_server(handle, concurrent=True) as base:
        try:
            yield base, live
        finally:
            stop.set()


def test_slow_archives_do_not_starve_new_jobs(
    sandbox: ManagedProcess,
    start_workers: StartWorkers,
    tmp_path: Path,
    slow_cdn: tuple[str, list[int]],
) -> None:
    """Nothing bounded how many worker slots archiving holds (webhooks were capped at half
    the fleet's slots; ``dispatch_archives`` published every due entry). A handful of
    succeeded jobs whose result host is slow (every download runs to
    REMIX_ARCHIVE_TIMEOUT_S, default 120 s, times the images) occupy every slot of a
    default worker (no ``-Q``), and a new job's submit and polls wait behind them."""
    base, live = slow_cdn
    svc = services()
    archiving = JobStore(svc.store.redis, ttl_s=3600, archive=True)
    slow = [uuid.uuid4().hex for _ in range(6)]
    for job_id in slow:
        archiving.create(job_id, {"prompt": unique_prompt("edge-slow"), **REMIX_INPUT}, due_in=600)
        assert archiving.finish(job_id, JobState.SUCCEEDED, result_urls=[f"{base}/{job_id}.png"])
    try:
        _starve(start_workers, tmp_path, live)
    finally:  # end their archiving, so that no later test waits behind them
        ended = Archive(state="failed", attempts=0, last_error="ended by the test")
        for job_id in slow:
            svc.store.redis.hset(keys.job(job_id), "archive", ended.model_dump_json())
        svc.store.redis.zrem(keys.ARCHIVE_SCHEDULE, *slow)
        svc.store.redis.zrem(keys.ARCHIVE_IN_FLIGHT, *slow)


def _starve(start_workers: StartWorkers, tmp_path: Path, live: list[int]) -> None:
    start_workers(
        concurrency=2,
        REMIX_ARCHIVE_URL=(tmp_path / "archive").as_uri(),
        REMIX_ARCHIVE_ALLOW_PRIVATE="1",
        REMIX_ARCHIVE_TIMEOUT_S="60",
    )
    wait_until(lambda: live[0] >= 1, 20, interval=0.2)  # archiving holds a slot

    started = time.monotonic()
    job_id = enqueue_remix(unique_prompt("attack-starved"), **REMIX_INPUT)  # type: ignore[arg-type]
    try:
        record = wait_for_job(job_id, timeout=25)
        state = record.state
    except TimeoutError:
        state = get_job(job_id).state  # type: ignore[union-attr]
    elapsed = time.monotonic() - started
    # Without archiving in the way the sandbox finishes a job in ~3 s.
    assert state is JobState.SUCCEEDED, (state, f"{elapsed:.1f}s", f"downloads live: {live[0]}")
    assert live[0] <= 1  # archive steps hold at most half of the fleet's 2 slots


@dataclass
class StallingHost:
    """A result host whose first answer stops after 8 bytes until the test ends (or
    ``release`` is set); later answers give the whole image at once."""

    base: str
    png: bytes
    first: threading.Event
    release: threading.Event
    requests: list[float]


@pytest.fixture
def stalling_host() -> Iterator[StallingHost]:
    png = whole_png(100)
    host = StallingHost("", png, threading.Event(), threading.Event(), [])
    lock = threading.Lock()

    def handle(conn: socket.socket) -> None:
        with lock:
            host.requests.append(time.monotonic())
            n = len(host.requests)
        head = f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(png)}\r\n\r\n"
        if n > 1:
            conn.sendall(head.encode() + png)
            return
        conn.sendall(head.encode() + png[:8])
        host.first.set()
        if host.release.wait(120):
            conn.sendall(png[8:])

    with raw_http_server(handle, concurrent=True) as base:
        host.base = base
        try:
            yield host
        finally:
            host.release.set()


def test_the_broker_redelivering_an_archive_step_cannot_undo_done(
    sandbox: ManagedProcess,
    start_workers: StartWorkers,
    tmp_path: Path,
    stalling_host: StallingHost,
) -> None:
    """With the defaults then (REMIX_ARCHIVE_TIMEOUT_S = 120 per image, the broker's
    visibility timeout 120 s) a 2-image step could run 240 s: past 120 s kombu put the
    unacked ``remix.archive`` back and another slot ran the SAME token at the same time,
    and archive_end.lua accepted both outcomes, so the copy whose signed URLs had expired
    turned ``done`` back into ``pending`` (then ``failed``).

    A step can no longer outlive the visibility timeout (its downloads share
    REMIX_BROKER_VISIBILITY_TIMEOUT_S - 60 s), so the redelivery is made real here the
    only way left: worker A is stopped (SIGSTOP) mid-download for longer than the
    (shortened) visibility timeout, the broker gives its message to worker B, whose copy
    archives (``done``); then A resumes, its download is past its deadline, and the
    failed try it records with the same token must not undo ``done``."""
    env = {
        "REMIX_ARCHIVE_URL": (tmp_path / "archive").as_uri(),
        "REMIX_ARCHIVE_ALLOW_PRIVATE": "1",
        "REMIX_BROKER_VISIBILITY_TIMEOUT_S": "65",
        "REMIX_ARCHIVE_TIMEOUT_S": "5",
    }
    svc = services()
    archiving = JobStore(svc.store.redis, ttl_s=3600, archive=True)
    resends_before = svc.metrics.read().get("archive_lease_resends_total", 0)
    job_id = uuid.uuid4().hex
    archiving.create(job_id, {"prompt": unique_prompt("edge-dup"), **REMIX_INPUT}, due_in=600)
    url = f"{stalling_host.base}/{job_id}/0.png"
    assert archiving.finish(job_id, JobState.SUCCEEDED, result_urls=[url])
    [paused] = start_workers(concurrency=1, **env)
    assert stalling_host.first.wait(30)
    os.killpg(paused.popen.pid, signal.SIGSTOP)  # worker A, mid-download
    try:
        start_workers(concurrency=1, **env)  # worker B

        def done() -> bool:
            found = get_job(job_id)
            return bool(found and found.archive and found.archive.state == "done")

        wait_until(done, 100, interval=0.5)  # B ran the redelivered message
        seen_done = get_job(job_id)
    finally:
        os.killpg(paused.popen.pid, signal.SIGCONT)
    time.sleep(5)  # A's try, past its deadline, ends and tries to record
    resends = svc.metrics.read().get("archive_lease_resends_total", 0)
    final = get_job(job_id)
    assert final is not None and final.archive is not None
    seen = stalling_host.requests
    # A's request, then B's, on the broker's redelivery (not a lease resend by the schedule).
    assert len(seen) == 2 and resends == resends_before, (seen, resends)
    assert final.archive.state == "done", (seen_done.archive if seen_done else None, final.archive)


def test_the_readme_queue_split_with_archiving_still_delivers_webhooks(
    sandbox: ManagedProcess, start_workers: StartWorkers, tmp_path: Path
) -> None:
    """README ("Completion webhooks") said: "Workers started with -Q notify for webhooks
    and -Q submit,poll for jobs separate them completely." With archiving on, nothing
    consumed ``archive`` in that fleet, no process warned, and every succeeded job's
    webhook waited for archiving forever (failed jobs' webhooks still went, so it looked
    healthy). Now that fleet is reported (every worker's log, ``remixq status``'s
    ``queues_without_workers``), and the README's split (``-Q notify,archive``) delivers."""
    from sandbox.launch import start_worker
    from tests.conftest import TEST_REDIS_URL, stop_all, worker_env
    from tests.webhook_receiver import receiver
    from worker.app import configure

    env = {
        "REMIX_ARCHIVE_URL": (tmp_path / "archive").as_uri(),
        "REMIX_ARCHIVE_ALLOW_PRIVATE": "1",
        "REMIX_NOTIFY_ALLOW_PRIVATE": "1",
    }
    started = [
        start_worker(worker_env(sandbox.url, **env), concurrency=1, queues=["submit", "poll"]),
        start_worker(worker_env(sandbox.url, **env), concurrency=1, queues=["notify"]),
    ]
    configure(
        redis_url=TEST_REDIS_URL, result_backend_url=TEST_REDIS_URL, remix_notify_allow_private=True
    )
    warning = "messages wait in queue archive and no live worker consumes it"
    try:
        with receiver() as hooks:
            job_id = enqueue_remix(
                unique_prompt("edge-split"),
                **REMIX_INPUT,
                notify_url=hooks.url("/done"),  # type: ignore[arg-type]
            )
            assert wait_for_job(job_id, timeout=60).state is JobState.SUCCEEDED
            # The old split: archiving cannot end, and that is visible.
            wait_until(lambda: all(warning in w.log_tail(10**6) for w in started), 40, interval=0.5)
            assert fleet_status()["queues_without_workers"] == ["archive"]
            assert not hooks.deliveries("/done")
            # The README's split: webhooks and archiving on their own workers.
            started.append(
                start_worker(
                    worker_env(sandbox.url, **env), concurrency=1, queues=["notify", "archive"]
                )
            )
            with contextlib.suppress(Exception):
                wait_until(lambda: hooks.deliveries("/done"), 30, interval=0.5)
            delivered = hooks.deliveries("/done")
            record = get_job(job_id)
            unconsumed = fleet_status()["queues_without_workers"]
    finally:
        configure(redis_url=TEST_REDIS_URL, result_backend_url=TEST_REDIS_URL)
        stop_all(started)
    assert delivered, (record.archive if record else None, record.notification if record else None)
    assert unconsumed == []


def test_kill_9_mid_download_then_archive_and_webhook_still_happen(
    sandbox: ManagedProcess,
    start_workers: StartWorkers,
    tmp_path: Path,
    stalling_host: StallingHost,
) -> None:
    """(It held.) The whole worker (process group) is SIGKILLed while its slot is
    mid-download; another worker finishes archiving (broker redelivery or the lease) and
    the webhook, which waited for archiving, is delivered once with ``done``.

    The visibility timeout is the shortest the 5 s download deadline allows (5 s + 60 s),
    so the broker hands the message on after about 65 s rather than the lease's 95 s."""
    from tests.webhook_receiver import receiver

    env = {
        "REMIX_ARCHIVE_URL": (tmp_path / "archive").as_uri(),
        "REMIX_ARCHIVE_ALLOW_PRIVATE": "1",
        "REMIX_BROKER_VISIBILITY_TIMEOUT_S": "65",
        "REMIX_ARCHIVE_TIMEOUT_S": "5",
        "REMIX_NOTIFY_ALLOW_PRIVATE": "1",
    }
    with receiver() as hooks:
        svc = services()
        archiving = JobStore(svc.store.redis, ttl_s=3600, archive=True)
        job_id = uuid.uuid4().hex
        archiving.create(
            job_id,
            {"prompt": unique_prompt("edge-kill"), **REMIX_INPUT},
            due_in=600,
            notify_url=hooks.url("/done"),
        )
        url = f"{stalling_host.base}/0.png"
        assert archiving.finish(job_id, JobState.SUCCEEDED, result_urls=[url])
        [victim] = start_workers(concurrency=1, **env)
        assert stalling_host.first.wait(30)
        victim.kill()
        start_workers(concurrency=1, **env)
        wait_until(lambda: hooks.deliveries("/done"), 170, interval=1)
        time.sleep(5)
        deliveries = hooks.deliveries("/done")
        final = get_job(job_id)
    assert final is not None and final.archive is not None and final.archive.state == "done"
    assert len({d.body for d in deliveries}) >= 1
    assert json.loads(deliveries[0].body)["archive"]["state"] == "done"
