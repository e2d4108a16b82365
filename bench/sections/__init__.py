"""The benchmark's sections; each starts what it needs, measures, stops it and returns rows.

One module per section, and :mod:`bench.sections.common` for what they share; this
package only lists them, in the order a full run takes them, for ``bench.cli``.
"""

from bench.sections.common import Plan, Run, Section
from bench.sections.end_to_end import end_to_end_section
from bench.sections.inflight import inflight_section
from bench.sections.overhead import overhead_section
from bench.sections.rate_limit import rate_limit_section
from bench.sections.requests import requests_section

__all__ = ["DEPENDS_ON", "SECTIONS", "Plan", "Run"]

#: Every section by its ``--only`` name, in the order a full run takes them.
SECTIONS: dict[str, Section] = {
    "rate-limit": rate_limit_section,
    "in-flight": inflight_section,
    "end-to-end": end_to_end_section,
    "overhead": overhead_section,
    "requests": requests_section,
}
#: Sections whose measurements another section reports.
DEPENDS_ON: dict[str, tuple[str, ...]] = {"requests": ("end-to-end", "overhead")}
