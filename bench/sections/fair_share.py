"""Section 10: one key shared by tenants and priorities, under the upstream's limit.

A bulk batch of tenant ``bulk-a`` is queued first, then two tenants of equal weight in
``normal``; interactive jobs of ``svc-b`` arrive one every few seconds meanwhile. The
figures: how long an interactive job waits from enqueue to acceptance, each equal
tenant's share of the moments they got, the accepted rate against the limit, the 429s;
then, apart, the cost of one pick with many jobs waiting (time, Redis memory per job).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from bench.report import Figure, ratio
from bench.sections.common import (
    CONCURRENCY,
    MS_PER_S,
    REFERENCE_IMAGE,
    SOURCE_IMAGE,
    Run,
    job_records,
    job_store,
    percentile,
    private_redis,
    redis_memory,
)
from bench.sections.rate_limit import RateMeasurement, measure_acceptance
from sandbox.control import SandboxControl
from worker.app import services
from worker.models import JobRecord
from worker.settings import parse_rate_limit
from worker.store.jobs import NewJob
from worker.store.lines import backstop_s

SECTION = "10 fair share"
RATE_LIMIT = "20/10s"
WORKERS = 3
BULK_TENANT, INTERACTIVE_TENANT = "bulk-a", "svc-b"
EQUAL_TENANTS = ("svc-c", "svc-d")
INTERACTIVE_EVERY_S = 5.0
CREATE_BATCH = 500
#: Jobs waiting while one pick is timed, and picks timed.
PICK_WAITING, PICK_WAITING_QUICK = 100_000, 20_000
PICKS = 1000


@dataclass(frozen=True)
class Sizes:
    bulk: int
    per_equal_tenant: int
    window_s: float
    warmup_s: float
    pick_waiting: int


def _sizes(run: Run) -> Sizes:
    quick = run.plan.rate_window_s < 40
    limit, window = parse_rate_limit(RATE_LIMIT)
    window_s = 2 * run.plan.rate_window_s
    # Enough equal-tenant jobs that both still wait when the window ends.
    per_tenant = int(limit / window * (window_s + 2 * run.plan.rate_warmup_s + 20))
    return Sizes(
        2000 if quick else 10_000,
        per_tenant,
        window_s,
        run.plan.rate_warmup_s,
        PICK_WAITING_QUICK if quick else PICK_WAITING,
    )


def _new_jobs(count: int, tenant: str, priority: str) -> list[NewJob]:
    return [
        NewJob(
            uuid.uuid4().hex,
            {
                "prompt": f"bench fair share {tenant}",
                "image_url": SOURCE_IMAGE,
                "reference_image_urls": [REFERENCE_IMAGE],
            },
            tenant=tenant,
            priority=priority,
        )
        for _ in range(count)
    ]


def _create(jobs: Sequence[NewJob]) -> list[str]:
    """Create the jobs in batches (each batch one transaction), as a batch producer does."""
    store, due_in = job_store(), backstop_s(services().settings)
    for start in range(0, len(jobs), CREATE_BATCH):
        store.create_many(jobs[start : start + CREATE_BATCH], due_in=due_in)
    return [job.job_id for job in jobs]


class InteractiveArrivals:
    """A thread that enqueues one interactive job every ``every`` seconds until stopped."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.ids: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="interactive", daemon=True)

    def __enter__(self) -> InteractiveArrivals:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.ids += _create(_new_jobs(1, INTERACTIVE_TENANT, "interactive"))
            self._stop.wait(self.every)


def fair_share_section(run: Run) -> list[Figure]:
    """Interactive waits, equal tenants' shares, the accepted rate, 429s; a pick's cost."""
    stack, sizes = run.stack, _sizes(run)
    limit, window = parse_rate_limit(RATE_LIMIT)
    stack.flush()
    sandbox = stack.start_sandbox(["--generation-seconds", "1", "--rate-limit", RATE_LIMIT])
    control = SandboxControl(sandbox.url or "")
    try:
        workers = stack.start_workers(
            sandbox, WORKERS, concurrency=CONCURRENCY, settings={"KIE_RATE_LIMIT": RATE_LIMIT}
        )
        try:
            started = time.time()
            _create(_new_jobs(sizes.bulk, BULK_TENANT, "bulk"))
            equal = {
                t: _create(_new_jobs(sizes.per_equal_tenant, t, "normal")) for t in EQUAL_TENANTS
            }
            with InteractiveArrivals(INTERACTIVE_EVERY_S) as interactive:
                measured = measure_acceptance(
                    control, started, limit=limit, warmup=sizes.warmup_s, window=sizes.window_s
                )
            waits = _waits(job_records(interactive.ids))
            shares = _shares(equal, measured_from=started + sizes.warmup_s)
        finally:
            stack.stop(workers)
        figures = _load_figures(sizes, limit / window, measured, waits, len(interactive.ids))
        figures += _share_figures(shares)
    finally:
        control.close()
        stack.stop([sandbox])
    return figures + _pick_cost(run, sizes.pick_waiting)


def _waits(records: Sequence[JobRecord]) -> list[float]:
    """Seconds from enqueue to acceptance of each accepted job."""
    return [r.submitted_at - r.created_at for r in records if r.submitted_at is not None]


def _shares(equal: dict[str, list[str]], measured_from: float) -> Counter[str]:
    """How many of each equal tenant's jobs were accepted after the warm-up."""
    counts: Counter[str] = Counter()
    for tenant, ids in equal.items():
        counts[tenant] = sum(
            1
            for r in job_records(ids)
            if r.submitted_at is not None and r.submitted_at >= measured_from
        )
    return counts


def _load_figures(
    sizes: Sizes, allowed: float, measured: RateMeasurement, waits: list[float], interactive: int
) -> list[Figure]:
    p95 = percentile(waits, 0.95) if waits else float("nan")
    return [
        Figure(
            SECTION,
            "interactive job: enqueue to acceptance, p95",
            f"{p95 * MS_PER_S:.0f} ms",
            "goal <= 1000 ms",
            "",
            f"{len(waits)} of {interactive} interactive jobs accepted, arriving one every "
            f"{INTERACTIVE_EVERY_S:g} s behind {sizes.bulk} bulk jobs and "
            f"{2 * sizes.per_equal_tenant} normal ones; max "
            f"{max(waits, default=float('nan')) * MS_PER_S:.0f} ms",
        ),
        Figure(
            SECTION,
            "accepted createTask/s, mixed load",
            f"{measured.rate:.2f}/s",
            f"{allowed:.2f}/s allowed ({RATE_LIMIT})",
            ratio(measured.rate, allowed, percent=True),
            f"{measured.accepted} acceptances over {measured.span:.1f} s; {WORKERS} workers x "
            f"{CONCURRENCY}",
        ),
        Figure(
            SECTION,
            "429 answers, mixed load",
            f"{measured.rate_limited}",
            "0",
            "",
            f"{measured.rate_limited} of {measured.create_requests} createTask requests",
        ),
    ]


def _share_figures(shares: Counter[str]) -> list[Figure]:
    total = sum(shares.values())
    first = EQUAL_TENANTS[0]
    share = shares[first] / total if total else 0.0
    return [
        Figure(
            SECTION,
            f"equal tenants: {first}'s share",
            f"{share * 100:.1f} %",
            "50 % (goal within 2 points)",
            "",
            ", ".join(f"{t} {shares[t]}" for t in EQUAL_TENANTS)
            + " jobs accepted after the warm-up",
        )
    ]


def _pick_cost(run: Run, waiting: int) -> list[Figure]:
    """Time per pick with ``waiting`` jobs in the lines, and Redis memory per waiting job."""
    stack = run.stack
    stack.flush()
    client = private_redis(stack)
    before = redis_memory(client)
    tenants = [f"tenant-{i}" for i in range(8)]
    per = waiting // (len(tenants) * 3)
    for priority in ("interactive", "normal", "bulk"):
        for tenant in tenants:
            _create(_new_jobs(per, tenant, priority))
    created = per * len(tenants) * 3
    per_job = (redis_memory(client) - before) / created
    in_lines = sum(int(client.memory_usage(k) or 0) for k in client.scan_iter("remixq:lines:*"))
    lines = services().lines
    started = time.perf_counter()
    for i in range(PICKS):
        lines.pick("kie", [f"bench-{i}"], {"tenant-0": 3.0}, 60.0)
    per_pick = (time.perf_counter() - started) / PICKS
    stack.flush()
    return [
        Figure(
            SECTION,
            f"one pick, {created:,} jobs waiting",
            f"{per_pick * MS_PER_S:.2f} ms",
            "",
            "",
            f"{PICKS} picks of one job each, one round trip each, "
            f"{len(tenants)} tenants x 3 priorities",
        ),
        Figure(
            SECTION,
            "Redis memory per waiting job: its place in line",
            f"{in_lines / created:.0f} B",
            "goal <= 1024 B",
            ratio(in_lines / created, 1024, percent=True),
            "what the scheduler adds per waiting job: the lines' sorted sets (MEMORY USAGE)",
        ),
        Figure(
            SECTION,
            "Redis memory per waiting job: all of it",
            f"{per_job:.0f} B",
            "",
            "",
            "the record with its request, its schedule and state index entries and its place "
            "in line (used_memory before and after); a record whose request is longer than "
            "Redis's hash-max-listpack-value (64 bytes by default) is stored as a hash table",
        ),
    ]
