"""Section 3: jobs/s of the pipeline against the naive worker, with a 5 s generation.

The naive worker holds a worker slot for a job's whole generation; the pipeline parks
the job in the schedule between polls, so its two slots serve every job at once.
"""

from __future__ import annotations

import math

from bench import naive
from bench.report import Figure, ratio
from bench.sections.common import (
    CONCURRENCY,
    NO_RATE_LIMIT,
    Run,
    naive_throughput,
    pipeline_throughput,
    remix_request,
)
from sandbox.control import SandboxControl

SECTION = "3 end to end"
E2E_GENERATION_S = 5.0
#: Labels of the upstream counts this section keeps for section 5.
E2E_KEY = "pipeline, 5 s generation"
NAIVE_KEY = "naive, 5 s generation"


def _naive_timeout(jobs: int, generation_s: float) -> float:
    """A generous bound for the naive worker: every job holds a slot for its whole run."""
    rounds = math.ceil(jobs / CONCURRENCY)
    per_job = (math.ceil(generation_s / naive.POLL_INTERVAL_S) + 1) * naive.POLL_INTERVAL_S
    return rounds * per_job * 2 + 30.0


def end_to_end_section(run: Run) -> list[Figure]:
    """Jobs/s of the pipeline against the naive worker, with a 5 s generation time."""
    jobs = run.plan.e2e_jobs
    sandbox = run.stack.start_sandbox(["--generation-seconds", f"{E2E_GENERATION_S:g}"])
    control = SandboxControl(sandbox.url or "")
    try:
        pipeline = pipeline_throughput(
            run,
            sandbox,
            control,
            jobs=jobs,
            label=E2E_KEY,
            settings={"KIE_RATE_LIMIT": NO_RATE_LIMIT},
        )
        request = remix_request("bench naive")
        baseline = naive_throughput(
            run,
            sandbox,
            control,
            send=lambda: naive.remix.delay(request),
            jobs=jobs,
            timeout=_naive_timeout(jobs, E2E_GENERATION_S),
            label=NAIVE_KEY,
        )
    finally:
        control.close()
        run.stack.stop([sandbox])
    setup = f"{jobs} jobs, 1 worker x {CONCURRENCY}, {E2E_GENERATION_S:g} s generation"
    return [
        Figure(
            SECTION,
            f"remixq pipeline ({setup})",
            f"{pipeline.rate:.2f} jobs/s",
            f"naive: {baseline.rate:.2f} jobs/s",
            ratio(pipeline.rate, baseline.rate),
            pipeline.note,
        ),
        Figure(
            SECTION,
            "naive worker (createTask, then sleep 2 s + recordInfo)",
            f"{baseline.rate:.2f} jobs/s",
            "",
            "",
            baseline.note,
        ),
    ]
