"""Section 5: upstream requests per job (createTask + recordInfo), from sections 3 and 4.

It measures nothing itself: it reads the sandbox's counters that sections 3 and 4 kept
in :attr:`Run.upstream`, which is why ``--only requests`` runs them too.
"""

from __future__ import annotations

from bench.report import Figure, ratio
from bench.sections.common import Run, Upstream
from bench.sections.end_to_end import E2E_KEY, NAIVE_KEY
from bench.sections.overhead import OVERHEAD_KEY

SECTION = "5 upstream requests"


def _per_job(counts: Upstream) -> tuple[float, float]:
    jobs = max(counts.jobs, 1)
    return counts.create_requests / jobs, counts.record_requests / jobs


def _per_job_text(counts: Upstream) -> str:
    create, record = _per_job(counts)
    return f"{create + record:.2f} ({create:.2f} create + {record:.2f} record)"


def requests_section(run: Run) -> list[Figure]:
    """Upstream requests per job (createTask + recordInfo), from sections 3 and 4."""
    figures: list[Figure] = []
    e2e, naive_counts, overhead = (run.upstream.get(k) for k in (E2E_KEY, NAIVE_KEY, OVERHEAD_KEY))
    if e2e is not None:
        baseline = f"naive: {_per_job_text(naive_counts)}" if naive_counts else ""
        figures.append(
            Figure(
                SECTION,
                f"per job, {E2E_KEY}",
                _per_job_text(e2e),
                baseline,
                ratio(sum(_per_job(e2e)), sum(_per_job(naive_counts))) if naive_counts else "",
                f"{e2e.create_requests} createTask + {e2e.record_requests} recordInfo "
                f"for {e2e.jobs} jobs",
            )
        )
    if overhead is not None:
        figures.append(
            Figure(
                SECTION,
                f"per job, {OVERHEAD_KEY}",
                _per_job_text(overhead),
                "2.00 minimum (1 create + 1 record)",
                ratio(sum(_per_job(overhead)), 2.0),
                f"{overhead.create_requests} createTask + {overhead.record_requests} "
                f"recordInfo for {overhead.jobs} jobs",
            )
        )
    return figures
