"""Section 7: upstream requests per job at a 5 s generation, callbacks on against polling only.

The same sandbox and the same number of jobs each time, one worker process (concurrency
2), the pipeline's default poll settings, the jobs enqueued at section 6's pace (so the
generations end, and the callbacks come, paced too). With callbacks on
(``KIE_CALLBACK_URL`` to the HTTP app, signed callbacks) the first safety-net poll comes
``REMIX_CALLBACK_POLL_S`` (60 s) after acceptance, so a job whose callback arrives is
never polled; polling only, recordInfo comes ``REMIX_POLL_INITIAL_S`` (2 s) after
acceptance and then 1.5 times later each time. Requests are the sandbox's counters
(createTask + recordInfo). The second figure is the time from the generation's end to
the record stored (as in section 6) in both runs.
"""

from __future__ import annotations

from bench.report import Figure, ratio
from bench.sections.common import (
    CONCURRENCY,
    NO_RATE_LIMIT,
    Run,
    callback_upstream,
    finish_delays_of,
    run_pipeline,
)
from worker.settings import Settings

SECTION = "7 callback requests"
GENERATION_S = 5.0
#: The goal of issue 7, in requests per job with callbacks on.
GOAL_PER_JOB = 1.1
#: The pipeline's defaults, set explicitly so that the caller's environment cannot change
#: them: the first poll and the longest interval polling only, the safety net's first poll.
POLL_SETTINGS = ("remix_poll_initial_s", "remix_poll_max_s", "remix_callback_poll_s")


def _default(name: str) -> float:
    value = Settings.model_fields[name].default
    assert isinstance(value, float)
    return value


def callback_requests_section(run: Run) -> list[Figure]:
    """Requests per job with callbacks against polling only, same jobs, same sandbox."""
    jobs, pace = run.plan.callback_requests_jobs, run.plan.callback_pace
    polls = {name.upper(): f"{_default(name):g}" for name in POLL_SETTINGS}
    with callback_upstream(run.stack, GENERATION_S, polls) as upstream:
        callbacks = run_pipeline(
            run,
            upstream.sandbox,
            upstream.control,
            prompts=["bench callbacks on"] * jobs,
            pace=pace,
            settings=upstream.settings,
        )
        callback_delays = finish_delays_of(run.stack, upstream.sandbox, callbacks)
        polling = run_pipeline(
            run,
            upstream.sandbox,
            upstream.control,
            prompts=["bench polling only"] * jobs,
            pace=pace,
            settings={"KIE_RATE_LIMIT": NO_RATE_LIMIT, **polls},
        )
        polling_delays = finish_delays_of(run.stack, upstream.sandbox, polling)
    setup = f"{jobs} jobs, 1 worker x {CONCURRENCY}, {GENERATION_S:g} s generation"
    on, off = callbacks.upstream, polling.upstream
    return [
        Figure(
            SECTION,
            f"per job with callbacks ({setup})",
            on.per_job_text(),
            f"polling only: {off.per_job_text()}",
            ratio(on.total_per_job, off.total_per_job),
            f"goal <= {GOAL_PER_JOB:.2f}: {'met' if on.total_per_job <= GOAL_PER_JOB else 'missed'}"
            f"; with callbacks {on.create_requests} createTask + {on.record_requests} "
            f"recordInfo, {callbacks.stats['callbacks_sent']} callbacks answered 2xx, "
            f"{callbacks.stats['callbacks_failed']} failed, first safety-net poll after "
            f"{_default('remix_callback_poll_s'):g} s; polling only "
            f"{off.create_requests} createTask + {off.record_requests} recordInfo, first poll "
            f"after {_default('remix_poll_initial_s'):g} s, longest interval "
            f"{_default('remix_poll_max_s'):g} s",
        ),
        Figure(
            SECTION,
            f"generation end -> record stored, p50 / p99 (enqueued {pace:g}/s)",
            callback_delays.text(),
            f"polling only: {polling_delays.text()}",
            ratio(callback_delays.p(0.5), polling_delays.p(0.5))
            if callback_delays.count and polling_delays.count
            else "",
            f"ratio of the p50s; with callbacks {callback_delays.note()}, "
            f"{callback_delays.spread()}; "
            f"polling only {polling_delays.note()}",
        ),
    ]
