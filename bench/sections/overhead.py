"""Section 4: jobs/s of the pipeline with instant generation against Celery no-op tasks/s.

With nothing to wait for upstream, every job is one createTask and one recordInfo, so
the ratio is the share of raw Celery task throughput that whole jobs reach: what the
pipeline's own bookkeeping (records, lines, schedule, dispatcher, rate limiter) costs.
The pipeline runs with Celery's task events for Flower (the default) and without
(``REMIX_TASK_EVENTS=false``), the no-op task with Celery's defaults (no events) and with
its worker's events, so that what the events cost each is measured in the same run. Each
of the four runs :data:`ROUNDS` times, in turn, and the best of each is kept.
"""

from __future__ import annotations

from collections.abc import Callable

from bench import naive
from bench.naive import TASK_EVENTS_VARIABLE
from bench.report import Figure, ratio
from bench.sections.common import (
    CONCURRENCY,
    NO_RATE_LIMIT,
    Run,
    Throughput,
    naive_throughput,
    pipeline_throughput,
)
from sandbox.control import SandboxControl
from worker.app import services

SECTION = "4 overhead"
OVERHEAD_POLL_INITIAL_S = 0.05
#: Each of the four runs this many times, in turn; the best of each is kept (on two
#: shared cores, one run can be slowed by anything else the machine does).
ROUNDS = 3
NOOP_TIMEOUT_S = 120.0
#: Label of the upstream counts this section keeps for section 5.
OVERHEAD_KEY = "pipeline, 0 s generation"


def _without_task_events(measure: Callable[[], Throughput]) -> Throughput:
    """``measure()`` with this producer sending no task-sent events (as its workers)."""
    conf = services().publisher.app.conf
    before = conf.task_send_sent_event
    conf.task_send_sent_event = False
    try:
        return measure()
    finally:
        conf.task_send_sent_event = before


def overhead_section(run: Run) -> list[Figure]:
    """Jobs/s of the pipeline with instant generation against Celery no-op tasks/s."""
    jobs = run.plan.overhead_jobs
    sandbox = run.stack.start_sandbox(["--generation-seconds", "0"])
    control = SandboxControl(sandbox.url or "")
    settings = {
        "KIE_RATE_LIMIT": NO_RATE_LIMIT,
        "REMIX_POLL_INITIAL_S": f"{OVERHEAD_POLL_INITIAL_S:g}",
    }

    def noop(worker_settings: dict[str, str]) -> Throughput:
        return naive_throughput(
            run,
            sandbox,
            control,
            send=naive.noop.delay,
            jobs=jobs,
            timeout=NOOP_TIMEOUT_S,
            settings=worker_settings,
        )

    measures: dict[str, Callable[[], Throughput]] = {
        "pipeline": lambda: pipeline_throughput(
            run, sandbox, control, jobs=jobs, label=OVERHEAD_KEY, settings=settings
        ),
        "quiet": lambda: _without_task_events(
            lambda: pipeline_throughput(
                run,
                sandbox,
                control,
                jobs=jobs,
                label=f"{OVERHEAD_KEY}, no task events",
                settings={**settings, "REMIX_TASK_EVENTS": "false"},
            )
        ),
        "baseline": lambda: noop({}),
        "baseline with events": lambda: noop({TASK_EVENTS_VARIABLE: "1"}),
    }
    rounds: dict[str, list[Throughput]] = {name: [] for name in measures}
    try:
        for _ in range(ROUNDS):
            for name, measure in measures.items():
                rounds[name].append(measure())
    finally:
        control.close()
        run.stack.stop([sandbox])
    pipeline, quiet, baseline, eventful = (
        max(rounds[name], key=lambda t: t.rate) for name in measures
    )
    setup = f"{jobs} jobs, 1 worker x {CONCURRENCY}, 0 s generation"
    return [
        Figure(
            SECTION,
            f"remixq pipeline ({setup})",
            f"{pipeline.rate:.1f} jobs/s",
            f"no-op: {baseline.rate:.1f} tasks/s",
            ratio(pipeline.rate, baseline.rate, percent=True),
            pipeline.note + f"; best of {ROUNDS}; first poll after {OVERHEAD_POLL_INITIAL_S:g} s",
        ),
        Figure(
            SECTION,
            f"remixq pipeline without task events ({setup})",
            f"{quiet.rate:.1f} jobs/s",
            f"no-op: {baseline.rate:.1f} tasks/s",
            ratio(quiet.rate, baseline.rate, percent=True),
            quiet.note
            + f"; best of {ROUNDS}; REMIX_TASK_EVENTS=false on the workers and the producer",
        ),
        Figure(
            SECTION,
            f"Celery no-op task, same Redis ({jobs} tasks)",
            f"{baseline.rate:.1f} tasks/s",
            "",
            "",
            baseline.note + f"; best of {ROUNDS}; Celery's defaults: no task events",
        ),
        Figure(
            SECTION,
            f"remixq pipeline ({setup}) against a no-op task with task events",
            f"{pipeline.rate:.1f} jobs/s",
            f"no-op with events: {eventful.rate:.1f} tasks/s",
            ratio(pipeline.rate, eventful.rate, percent=True),
            "both workers send Celery's task events, as Flower needs them (the pipeline "
            "also sends each message's task-sent event, the no-op's producer does not)",
        ),
        Figure(
            SECTION,
            f"Celery no-op task with task events, same Redis ({jobs} tasks)",
            f"{eventful.rate:.1f} tasks/s",
            "",
            "",
            eventful.note + f"; best of {ROUNDS}; worker_send_task_events on, as "
            "`celery worker -E` or Flower's enable_events",
        ),
    ]
