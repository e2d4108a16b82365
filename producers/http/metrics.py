"""The fleet's metrics in the Prometheus text format, read from Redis at scrape time.

Workers count into Redis (:mod:`worker.store.metrics`); when ``/metrics`` is scraped this
collector turns every stored counter (``name:label`` ->
``remixq_name{<label name>="label"}``), the jobs by state, the queue depths, the live
workers and the histograms into metric families, plus what this process counted in its
own memory (:data:`PROCESS_COUNTERS`: unsigned callbacks refused). The design:
docs/design.md, "Metrics"; the metrics and alerts: docs/operations.md.
"""

from __future__ import annotations

import re
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from producers.fleet import tenant_lines
from worker import keys
from worker.app import services
from worker.fleet.dispatcher import HEARTBEAT_S
from worker.services import Services
from worker.store.metrics import HISTOGRAMS
from worker.store.publisher import ARCHIVE_QUEUE, NOTIFY_QUEUE, POLL_QUEUE, SUBMIT_QUEUE

NAMESPACE = "remixq"
QUEUES = (SUBMIT_QUEUE, POLL_QUEUE, NOTIFY_QUEUE, ARCHIVE_QUEUE)
#: A worker whose last heartbeat is older than this is not counted as live.
LIVE_WORKER_S = 3 * HEARTBEAT_S
#: The label name of each counter family stored with a ``:label`` suffix.
LABEL_NAMES = {
    "create_task_total": "code",
    "record_info_total": "code",
    "upload_total": "code",
    "jobs_finished_total": "outcome",
    "pauses_total": "reason",
    "callbacks_total": "outcome",
    "callbacks_refused_total": "reason",
    "notify_total": "outcome",
    "archive_total": "outcome",
}
DEFAULT_LABEL_NAME = "label"
HELP = {
    "create_task_total": "createTask answers by code (429: rate limited upstream)",
    "record_info_total": "recordInfo answers (polls) by code",
    "upload_total": "File Upload answers (source images given as files) by code",
    "jobs_finished_total": "Jobs finished, by outcome (succeeded, or the fail code)",
    "retries_total": "createTask retries after a retryable error",
    "pauses_total": "Submission pauses of an API key, by reason",
    "limiter_waits_total": "Submits parked to wait for the key's shared budget",
    "spend_cap_waits_total": "Submits parked to wait for the key's spend cap",
    "spend_reservations_total": "Spend reservations made (createTasks that may be charged)",
    "spend_refunds_total": "Spend reservations given back after a definite refusal",
    "callbacks_total": "Upstream callbacks acted on",
    "callbacks_refused_total": (
        "Upstream callbacks refused, by reason (those without a valid signature: counted by "
        "this app process)"
    ),
    "unknown_outcomes_total": "createTask requests whose answer was lost after sending",
    "possibly_paid_twice_total": "Jobs sent again after an unknown outcome and accepted",
    "accepts_unreplicated_total": (
        "Accepted upstream tasks no Redis replica acknowledged in time (REMIX_ACCEPT_WAIT_MS)"
    ),
    "lease_resends_total": "Jobs sent again because their step was lost",
    "notify_total": "Completion webhook tries, by outcome",
    "notify_lease_resends_total": "Completion webhooks sent again after a lost delivery",
    "archive_total": "Archiving tries of result images, by outcome",
    "archive_lease_resends_total": "Archiving sent again after a lost step",
    "create_task_seconds": "Latency of createTask requests",
    "record_info_seconds": "Latency of recordInfo requests",
    "job_seconds": "Time from enqueue to the end of a job",
}
_VALID_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class ProcessCounters:
    """Counters kept in this process's memory (named like the fleet's, ``name:label``).

    For what anyone on the network can make happen at will (unsigned callbacks): counting
    it costs no Redis work. A scrape adds them to the fleet's counters of the same name.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def read(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


#: This process's own counters (see :class:`ProcessCounters`).
PROCESS_COUNTERS = ProcessCounters()


class FleetCollector(Collector):
    """Reads the fleet's counters, gauges and histograms from Redis on every scrape.

    A Redis error propagates, so a scrape fails (``/metrics`` answers 503) rather than
    reporting zeros.
    """

    def __init__(self, svc: Services | None = None) -> None:
        self._svc = svc

    def describe(self) -> Iterable[Metric]:
        # Nothing to declare up front: registering must not read Redis.
        return []

    def collect(self) -> Iterator[Metric]:
        svc = self._svc or services()
        yield from counter_families(with_process_counts(svc.metrics.read()))
        yield _jobs_by_state(svc)
        yield _queue_depths(svc)
        yield _live_workers(svc)
        yield from _tenant_lines()
        for name in HISTOGRAMS:
            yield _histogram(svc, name)


#: Counters without a label, shown as 0 before anything counted them (for dashboards).
PLAIN_COUNTERS = (
    "retries_total",
    "limiter_waits_total",
    "spend_cap_waits_total",
    "spend_reservations_total",
    "spend_refunds_total",
    "unknown_outcomes_total",
    "possibly_paid_twice_total",
    "lease_resends_total",
)


def with_process_counts(stored: dict[str, int]) -> dict[str, int]:
    """The fleet's counters plus this process's own (:data:`PROCESS_COUNTERS`)."""
    counts = Counter(stored)
    counts.update(PROCESS_COUNTERS.read())
    return dict(counts)


def counter_families(stored: dict[str, int]) -> Iterator[CounterMetricFamily]:
    """One family per stored counter name; the part after a colon becomes a label."""
    grouped: dict[str, dict[str | None, int]] = defaultdict(dict)
    for name in PLAIN_COUNTERS:
        grouped[name][None] = 0
    for stored_name, value in stored.items():
        name, _, label = stored_name.partition(":")
        if _VALID_NAME.match(name):
            grouped[name][label if label else None] = value
    for name, samples in sorted(grouped.items()):
        if all(label is None for label in samples):
            yield CounterMetricFamily(_full(name), _help(name), value=samples[None])
            continue
        family = CounterMetricFamily(
            _full(name), _help(name), labels=[LABEL_NAMES.get(name, DEFAULT_LABEL_NAME)]
        )
        for label_value, value in sorted(samples.items(), key=lambda item: item[0] or ""):
            family.add_metric([label_value or ""], value)
        yield family


def _jobs_by_state(svc: Services) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        _full("jobs"), "Jobs by state (finished ones until their records expire)", labels=["state"]
    )
    for state, count in svc.store.count_by_state().items():
        family.add_metric([state], count)
    return family


def _queue_depths(svc: Services) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        _full("queue_depth"), "Messages waiting in a broker queue", labels=["queue"]
    )
    pipe = svc.broker.pipeline(transaction=False)
    for queue in QUEUES:
        pipe.llen(queue)
    for queue, depth in zip(QUEUES, pipe.execute(), strict=True):
        family.add_metric([queue], int(depth))
    return family


def _live_workers(svc: Services) -> GaugeMetricFamily:
    live = svc.broker.zcount(keys.WORKERS, svc.clock.now() - LIVE_WORKER_S, "+inf")
    return GaugeMetricFamily(
        _full("workers_live"), "Worker processes with a recent heartbeat", value=int(live)
    )


#: The gauges of the waiting lines: (name, the row's field, help).
LINE_GAUGES = (
    ("tenant_waiting", "waiting", "Jobs waiting in line for a send moment"),
    ("tenant_oldest_wait_seconds", "oldest_wait_s", "How long the oldest job in line waited"),
    ("tenant_sends_per_minute", "sends_per_minute", "Jobs given a send moment per minute"),
    ("tenant_budget_share", "budget_share", "Share of the provider's send moments"),
)


def _tenant_lines() -> Iterator[GaugeMetricFamily]:
    """Per provider, priority and tenant (:func:`producers.fleet.tenant_lines`)."""
    rows = tenant_lines()
    for name, field, text in LINE_GAUGES:
        family = GaugeMetricFamily(_full(name), text, labels=["provider", "priority", "tenant"])
        for row in rows:
            family.add_metric([row["provider"], row["priority"], row["tenant"]], row[field])
        yield family


def _histogram(svc: Services, name: str) -> HistogramMetricFamily:
    buckets, total, _ = svc.metrics.read_histogram(name)
    return HistogramMetricFamily(
        _full(name),
        _help(name),
        buckets=[(bound, float(count)) for bound, count in buckets],
        sum_value=total,
    )


def _full(name: str) -> str:
    return f"{NAMESPACE}_{name}"


def _help(name: str) -> str:
    return HELP.get(name, name.replace("_", " "))


def fleet_registry(svc: Services | None = None) -> CollectorRegistry:
    """A registry holding only the fleet's collector (no process metrics of the app)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(svc))
    return registry
