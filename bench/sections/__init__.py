"""The benchmark's sections; each starts what it needs, measures, stops it and returns rows.

One module per section, and :mod:`bench.sections.common` for what they share; this
package only lists them, in the order a full run takes them, for ``bench.cli``.
"""

from bench.sections.callback_latency import callback_latency_section
from bench.sections.callback_requests import callback_requests_section
from bench.sections.common import Plan, Run, Section
from bench.sections.end_to_end import end_to_end_section
from bench.sections.fair_share import fair_share_section
from bench.sections.http_enqueue import http_enqueue_section
from bench.sections.inflight import inflight_section
from bench.sections.job_cost import job_cost_section
from bench.sections.overhead import overhead_section
from bench.sections.rate_limit import rate_limit_section
from bench.sections.requests import requests_section

__all__ = ["DEPENDS_ON", "GROUPS", "SECTIONS", "Plan", "Run"]

#: Every section by its ``--only`` name, in the order a full run takes them.
SECTIONS: dict[str, Section] = {
    "rate-limit": rate_limit_section,
    "in-flight": inflight_section,
    "end-to-end": end_to_end_section,
    "overhead": overhead_section,
    "requests": requests_section,
    "callback-latency": callback_latency_section,
    "callback-requests": callback_requests_section,
    "http-enqueue": http_enqueue_section,
    "job-cost": job_cost_section,
    "fair-share": fair_share_section,
}
#: Sections whose measurements another section reports.
DEPENDS_ON: dict[str, tuple[str, ...]] = {"requests": ("end-to-end", "overhead")}
#: Names for several sections at once, also for ``--only``.
GROUPS: dict[str, tuple[str, ...]] = {
    "service": ("callback-latency", "callback-requests", "http-enqueue"),
}
