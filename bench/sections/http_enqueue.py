"""Section 8: jobs enqueued per second over HTTP (``POST /v1/jobs``) against in-process.

The HTTP app runs as one uvicorn process (``uvicorn producers.http:app``, its defaults:
uvloop and httptools when installed, the access log on) with ``REMIX_API_TOKENS`` set, as
in production. A client in the benchmark process keeps 32 requests in flight over
kept-alive connections (see :func:`post_jobs`). The baseline is
``producers.enqueue_remix`` called in the benchmark process, one job after the other, on
the same Redis, for the same number of jobs. No worker runs, so nothing but the
enqueueing uses the machine; each way starts from an empty Redis after a short warm-up
(connections opened, scripts loaded).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11

from bench.procfs import tree_usage
from bench.report import Figure, ratio
from bench.sections.common import Run, enqueue_jobs, job_states, remix_request, stop_started
from sandbox.launch import LOOPBACK, ManagedProcess

SECTION = "8 HTTP enqueue"
IN_FLIGHT = 32
WARMUP_JOBS = 2 * IN_FLIGHT
REQUEST_TIMEOUT_S = 30.0
READ_BYTES = 65536
JOBS_PATH = "/v1/jobs"
ACCEPTED = 202


@dataclass
class Posted:
    """What the HTTP client saw: job ids of the 202 answers, every status and error."""

    ids: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.ids) / self.seconds if self.seconds > 0 else 0.0


class _Connection:
    """One kept-alive HTTP/1.1 connection to the app (h11 over asyncio streams)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._h11 = h11.Connection(h11.CLIENT)

    async def exchange(self, request: h11.Request, body: bytes) -> tuple[int, bytes]:
        """Send one request; returns the answer's status and body."""
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
            self._h11 = h11.Connection(h11.CLIENT)
        reader, writer = self._streams
        conn = self._h11
        writer.write(
            conn.send(request) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        )
        status, chunks = 0, []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(READ_BYTES))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the app closed the connection")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            self.close()
        return status, b"".join(chunks)

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


async def post_jobs(url: str, token: str, count: int, prompt: str) -> Posted:
    """POST ``count`` jobs to the app, ``IN_FLIGHT`` at a time over kept-alive connections.

    A lean client (h11 over asyncio streams): ``httpx.AsyncClient`` spends more CPU per
    request than the app itself (about 4.5 ms against 2.5 ms on a 2-core EPYC), so on a
    small machine the figure would measure the client.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or LOOPBACK, parts.port or 80
    body = json.dumps(remix_request(prompt)).encode()
    headers = [
        ("Host", f"{host}:{port}"),
        ("Authorization", f"Bearer {token}"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
    ]
    request = h11.Request(method="POST", target=JOBS_PATH, headers=headers)
    posted = Posted()
    pending = iter(range(count))

    async def sender() -> None:
        connection = _Connection(host, port)
        try:
            for _ in pending:  # one iterator shared by every sender: each job is sent once
                try:
                    status, answer = await asyncio.wait_for(
                        connection.exchange(request, body), REQUEST_TIMEOUT_S
                    )
                except (OSError, h11.ProtocolError, TimeoutError) as exc:
                    posted.errors[type(exc).__name__] += 1
                    connection.close()
                    continue
                posted.statuses[status] += 1
                if status == ACCEPTED:
                    posted.ids.append(json.loads(answer)["job_id"])
        finally:
            connection.close()

    started = time.monotonic()
    await asyncio.gather(*(sender() for _ in range(IN_FLIGHT)))
    posted.seconds = time.monotonic() - started
    return posted


def http_enqueue_section(run: Run) -> list[Figure]:
    """Requests/s of ``POST /v1/jobs`` against ``enqueue_remix`` in-process, same Redis."""
    stack, jobs = run.stack, run.plan.http_jobs
    api: ManagedProcess | None = None
    try:
        stack.flush()
        enqueue_jobs(WARMUP_JOBS, "bench enqueue warm-up")
        stack.flush()
        local = enqueue_jobs(jobs, "bench enqueue in-process")
        local_states = Counter(job_states(local.ids).values())
        stack.flush()
        api = stack.start_api(None, {})
        url = api.url or ""
        asyncio.run(post_jobs(url, stack.api_token, WARMUP_JOBS, "bench enqueue warm-up"))
        stack.flush()
        app_cpu, own_cpu = tree_usage(api.popen.pid).cpu_seconds, time.process_time()
        posted = asyncio.run(post_jobs(url, stack.api_token, jobs, "bench enqueue over HTTP"))
        app_cpu = tree_usage(api.popen.pid).cpu_seconds - app_cpu
        own_cpu = time.process_time() - own_cpu
        http_states = Counter(job_states(posted.ids).values())
    finally:
        stop_started(stack, [api])
    answers = ", ".join(f"{n} x {status}" for status, n in sorted(posted.statuses.items()))
    errors = ", ".join(f"{n} x {name}" for name, n in posted.errors.most_common())
    return [
        Figure(
            SECTION,
            f"POST /v1/jobs, 1 uvicorn process, {IN_FLIGHT} in flight ({jobs} jobs)",
            f"{posted.rate:.0f} requests/s",
            f"enqueue_remix in-process: {local.rate:.0f} jobs/s",
            ratio(posted.rate, local.rate),
            f"{len(posted.ids)} of {jobs} answered 202 in {posted.seconds:.1f} s ({answers}"
            + (f"; errors: {errors}" if errors else "")
            + f"); records: {_states(http_states)}; the app used "
            f"{app_cpu / max(posted.seconds, 1e-9):.2f} cores, "
            f"{app_cpu / max(len(posted.ids), 1) * 1000:.2f} ms of CPU per job, the client "
            f"{own_cpu / max(posted.seconds, 1e-9):.2f} cores",
        ),
        Figure(
            SECTION,
            "enqueue_remix in-process, one at a time",
            f"{local.rate:.0f} jobs/s",
            "",
            "",
            f"{len(local.ids)} jobs in {local.ended - local.started:.1f} s; "
            f"records: {_states(local_states)}",
        ),
    ]


def _states(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {state}" for state, n in counts.most_common())
