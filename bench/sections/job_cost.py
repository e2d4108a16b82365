"""Section 9: what one job costs Redis: commands and round trips, enqueue to finish.

Jobs run one at a time through one worker (concurrency 2) with a generation that makes
each job polled exactly twice (the first poll finds it generating, the second finished).
``INFO commandstats`` (commands run by Lua scripts included) and ``total_reads_processed``
(one per request a client sent: a pipeline or a script call is one) are read before and
after; what the idle fleet does meanwhile (the dispatcher's rounds, heartbeats), measured
for as long with no job, is taken off.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import redis

from bench.report import Figure
from bench.sections.common import (
    CONCURRENCY,
    NO_RATE_LIMIT,
    Run,
    enqueue_prompts,
    finished_records,
    private_redis,
    wait_for_states,
)
from sandbox.control import SandboxControl
from worker.models import JobState

SECTION = "9 job cost"
#: Polls at 0.3 s and 0.75 s after acceptance; the generation ends between them.
POLL_INITIAL_S = 0.3
GENERATION_S = 0.5
JOBS = 20
POLLS = 2
JOB_TIMEOUT_S = 30.0
SETTLE_S = 1.0
#: After its last recordInfo answer, a job is finished well within this.
FINISH_S = 0.3


@dataclass(frozen=True)
class Usage:
    """Commands by name, and requests (round trips), over a window."""

    commands: Counter[str]
    requests: int
    seconds: float

    def minus(self, idle: Usage) -> Usage:
        """This window less what the idle rate would have done in it."""
        share = self.seconds / idle.seconds if idle.seconds else 0.0
        commands = Counter(
            {
                name: round(count - idle.commands.get(name, 0) * share)
                for name, count in self.commands.items()
            }
        )
        requests = round(self.requests - idle.requests * share)
        return Usage(+commands, requests, self.seconds)


def _read(client: redis.Redis) -> tuple[Counter[str], int]:
    stats = client.info("commandstats")
    calls = Counter(
        {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}
    )
    return calls, int(client.info("stats")["total_reads_processed"])


def _measure(client: redis.Redis, action: Callable[[], None]) -> Usage:
    """Redis use while ``action()`` runs (the measuring calls themselves are taken off)."""
    calls, reads = _read(client)
    started = time.monotonic()
    action()
    seconds = time.monotonic() - started
    after, reads_after = _read(client)
    # The two INFO calls of the first read are counted in the second.
    own = Counter({"info": 2})
    return Usage(after - calls - own, reads_after - reads - 2, seconds)


def _wait_for_polls(control: SandboxControl, total: int) -> None:
    ends = time.monotonic() + JOB_TIMEOUT_S
    while int(control.stats()["record_requests"]) < total:
        if time.monotonic() > ends:
            raise TimeoutError(f"fewer than {total} recordInfo requests in {JOB_TIMEOUT_S:g} s")
        time.sleep(0.02)


def job_cost_section(run: Run) -> list[Figure]:
    """Redis commands and round trips of one job: enqueue, submit, two polls, finish."""
    stack = run.stack
    stack.flush()  # what earlier sections left in Redis would be polled meanwhile
    sandbox = stack.start_sandbox(["--generation-seconds", f"{GENERATION_S:g}"])
    control = SandboxControl(sandbox.url or "")
    client = private_redis(stack)
    settings = {
        "KIE_RATE_LIMIT": NO_RATE_LIMIT,
        "REMIX_POLL_INITIAL_S": f"{POLL_INITIAL_S:g}",
        "REMIX_POLL_MAX_S": "1",
    }
    workers = stack.start_workers(sandbox, 1, concurrency=CONCURRENCY, settings=settings)
    polls: list[int] = []
    try:
        time.sleep(SETTLE_S)  # the worker's start-up writes are not the job's

        job_ids: list[str] = []

        def one_job_at_a_time() -> None:
            # Waits on the sandbox's counters, not on Redis: only the pipeline reads Redis.
            for n in range(JOBS):
                job_ids.extend(enqueue_prompts([f"bench job cost {n}"]).ids)
                _wait_for_polls(control, POLLS * (n + 1))
                time.sleep(FINISH_S)

        busy = _measure(client, one_job_at_a_time)
        idle = _measure(client, lambda: time.sleep(busy.seconds))
        wait_for_states(job_ids, (), JOB_TIMEOUT_S)
        records = finished_records(job_ids)
        polls.extend(r.polls for r in records if r.state is JobState.SUCCEEDED)
    finally:
        control.close()
        stack.stop([*workers, sandbox])
    per_job = busy.minus(idle)
    jobs = max(len(polls), 1)
    top = ", ".join(f"{name} {count / jobs:.1f}" for name, count in per_job.commands.most_common(8))
    polled = f"{sum(polls) / jobs:.1f} polls per job" if polls else "no job succeeded"
    return [
        Figure(
            SECTION,
            f"Redis commands per job (enqueue, submit, 2 polls, finish; {jobs} jobs)",
            f"{sum(per_job.commands.values()) / jobs:.0f}",
            "",
            "",
            f"{polled}; the most called: {top}; commands run by Lua scripts included; "
            f"the idle fleet's {sum(idle.commands.values()) / idle.seconds:.0f} commands/s "
            f"taken off",
        ),
        Figure(
            SECTION,
            "Redis round trips per job (a pipeline or a script call is one)",
            f"{per_job.requests / jobs:.0f}",
            "",
            "",
            f"total_reads_processed; the idle fleet's {idle.requests / idle.seconds:.0f}/s "
            f"taken off",
        ),
    ]
