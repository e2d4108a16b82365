"""Section 6: from a generation's end upstream to its job's record stored, with callbacks.

Real workers send every createTask with ``KIE_CALLBACK_URL`` pointing at the HTTP app
(``uvicorn producers.http:app``); the sandbox signs its callbacks with the same
``KIE_WEBHOOK_HMAC_KEY`` and POSTs each one when its task's generation ends. The
generation times are spread (``[sandbox:seconds=N]`` in each prompt, growing by
``1 / pace`` from job to job), so the callbacks come paced, as generations end, rather
than all at once. The figure is, per job, the record's ``finished_at`` (the Redis server's
clock, set by the script that stores the final state) minus the sandbox's generation end
(recordInfo's ``completeTime``, ``time.time()`` in the sandbox): both this machine's
real-time clock. It includes the sandbox's callback scheduler tick (up to 50 ms), its
POST, the app's checks and Redis work.
"""

from __future__ import annotations

import math

from bench.report import Figure
from bench.sections.common import (
    CONCURRENCY,
    PIPELINE_TIMEOUT_S,
    FinishDelays,
    Run,
    callback_upstream,
    finish_delays_of,
    percentile,
    run_pipeline,
)
from sandbox.callbacks import SCHEDULER_TICK_S

SECTION = "6 callback latency"
#: The shortest generation: its callback comes long after the worker recorded the task.
LEAD_S = 2.0
#: The goal of issue 7: p99 at most this.
GOAL_P99_S = 0.100
#: The safety-net poll comes this long after the longest generation, so none fires.
SAFETY_NET_MARGIN_S = 60.0


def generation_seconds(index: int, pace: float) -> float:
    """Generation time of the ``index``-th job: ends ``1 / pace`` s apart if sent together."""
    return LEAD_S + index / pace


def prompts(jobs: int, pace: float) -> list[str]:
    return [
        f"bench callback {index} [sandbox:seconds={generation_seconds(index, pace):.3f}]"
        for index in range(jobs)
    ]


def callback_latency_section(run: Run) -> list[Figure]:
    """p50 / p99 from generation end to record stored, callbacks paced as generations end."""
    jobs, pace = run.plan.callback_jobs, run.plan.callback_pace
    longest = generation_seconds(jobs - 1, pace)
    settings = {"REMIX_CALLBACK_POLL_S": f"{math.ceil(longest + SAFETY_NET_MARGIN_S)}"}
    with callback_upstream(run.stack, LEAD_S, settings) as upstream:
        done = run_pipeline(
            run,
            upstream.sandbox,
            upstream.control,
            prompts=prompts(jobs, pace),
            settings=upstream.settings,
            timeout=longest + PIPELINE_TIMEOUT_S,
            watch=upstream.api,
        )
        delays = finish_delays_of(run.stack, upstream.sandbox, done)
    submitted = [r.submitted_at for r in done.records if r.submitted_at is not None]
    fill_end = max(submitted, default=0.0)
    stats = done.stats
    p99 = delays.p(0.99)
    return [
        Figure(
            SECTION,
            f"callback -> record stored, p50 / p99 ({jobs} jobs, 1 worker x {CONCURRENCY})",
            delays.text(),
            f"goal: p99 <= {GOAL_P99_S * 1000:.0f} ms",
            f"{p99 / GOAL_P99_S * 100:.1f} %" if delays.count else "n/a",
            f"{delays.note()}; {delays.spread()}; {_phases(delays, fill_end)}; "
            f"from the sandbox's generation end (its clock, ms) to the record's finished_at "
            f"(Redis TIME), one machine's clock; includes the sandbox's callback tick "
            f"(up to {SCHEDULER_TICK_S * 1000:.0f} ms); sandbox: "
            f"{stats['callbacks_sent']} callbacks answered 2xx, "
            f"{stats['callbacks_failed']} failed; {done.upstream.create_requests} createTask + "
            f"{done.upstream.record_requests} recordInfo",
        ),
        _app_cpu_figure(done.watched_cpu, int(stats["callbacks_sent"])),
    ]


def _app_cpu_figure(cpu_seconds: float, callbacks: int) -> Figure:
    """The HTTP app's CPU per callback, and the rate one app process would sustain."""
    per_callback = cpu_seconds / max(callbacks, 1)
    return Figure(
        SECTION,
        "HTTP app CPU per callback (1 uvicorn process)",
        f"{per_callback * 1000:.1f} ms",
        f"{1 / per_callback:.0f} callbacks/s at one core" if per_callback > 0 else "",
        "",
        f"{cpu_seconds:.1f} s of CPU of the app process from the first enqueue to the last "
        f"job finished, for {callbacks} callbacks: one app process (one Python thread of "
        "work at a time) handles about the reference rate, so a burst above it queues",
    )


def _phases(delays: FinishDelays, fill_end: float) -> str:
    """p99 of the callbacks that came while the worker still sent createTask, and after."""
    pairs = list(zip(delays.delays, delays.ends, strict=True))
    during = [delay for delay, end in pairs if end <= fill_end]
    after = [delay for delay, end in pairs if end > fill_end]
    parts = []
    for label, values in (("while the worker still submitted", during), ("after", after)):
        if values:
            parts.append(f"{label}: p99 {percentile(values, 0.99) * 1000:.0f} ms of {len(values)}")
    return "; ".join(parts) if parts else "no phases"
