"""Section 5: upstream requests per job (createTask + recordInfo), from sections 3 and 4.

It measures nothing itself: it reads the sandbox's counters that sections 3 and 4 kept
in :attr:`Run.upstream`, which is why ``--only requests`` runs them too.
"""

from __future__ import annotations

from bench.report import Figure, ratio
from bench.sections.common import Run
from bench.sections.end_to_end import E2E_KEY, NAIVE_KEY
from bench.sections.overhead import OVERHEAD_KEY

SECTION = "5 upstream requests"


def requests_section(run: Run) -> list[Figure]:
    """Upstream requests per job (createTask + recordInfo), from sections 3 and 4."""
    figures: list[Figure] = []
    e2e, naive_counts, overhead = (run.upstream.get(k) for k in (E2E_KEY, NAIVE_KEY, OVERHEAD_KEY))
    if e2e is not None:
        baseline = f"naive: {naive_counts.per_job_text()}" if naive_counts else ""
        figures.append(
            Figure(
                SECTION,
                f"per job, {E2E_KEY}",
                e2e.per_job_text(),
                baseline,
                ratio(e2e.total_per_job, naive_counts.total_per_job) if naive_counts else "",
                f"{e2e.create_requests} createTask + {e2e.record_requests} recordInfo "
                f"for {e2e.jobs} jobs",
            )
        )
    if overhead is not None:
        figures.append(
            Figure(
                SECTION,
                f"per job, {OVERHEAD_KEY}",
                overhead.per_job_text(),
                "2.00 minimum (1 create + 1 record)",
                ratio(overhead.total_per_job, 2.0),
                f"{overhead.create_requests} createTask + {overhead.record_requests} "
                f"recordInfo for {overhead.jobs} jobs",
            )
        )
    return figures
