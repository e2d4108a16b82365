"""Every Redis key remixq uses, in one place.

Job records, the schedule and idempotency keys live in the result backend's Redis
(``RESULT_BACKEND_URL``); the per-key fleet state (budget, pause, breaker, metrics) lives in
the broker's Redis (``REDIS_URL``), which every worker shares. By default both are the same
server. The Lua scripts in ``worker/lua`` receive these keys as ``KEYS``; the only key a script
derives itself is a job's hash from ``JOB_PREFIX`` (in ``claim_due.lua``), which is fine on the
single Redis server the pipeline runs on.
"""

from __future__ import annotations

PREFIX = "remixq:"

#: One hash per job: the public record's fields and internal ones (``_request`` ...).
JOB_PREFIX = PREFIX + "job:"
#: Sorted set of unfinished jobs, scored by when their next step is due (Redis clock).
SCHEDULE = PREFIX + "schedule"
IDEMPOTENCY_PREFIX = PREFIX + "idem:"
#: Ids of the API keys workers use (hash: key id -> its rate limit), never the keys.
KNOWN_API_KEYS = PREFIX + "keys"
#: Counters (hash): pauses by reason, unknown createTask outcomes, ...
METRICS = PREFIX + "metrics"
#: Recent poll lateness samples, for the benchmark.
POLL_LATENESS = PREFIX + "stats:poll_lateness"
#: Pub/sub channel on which the id of every job that finishes is published (long polls).
FINISHED_CHANNEL = PREFIX + "finished"
#: Sorted set of finished jobs whose completion webhook is due, scored by when.
NOTIFY_SCHEDULE = PREFIX + "notify"
#: Sorted set of live workers, scored by their last heartbeat (Redis clock).
WORKERS = PREFIX + "workers"
#: Histograms (one hash each: bucket bound -> count, plus ``sum`` and ``count``).
HISTOGRAM_PREFIX = PREFIX + "hist:"
#: Job states in the order of their index keys (see :func:`state_indexes`).
STATES = ("queued", "submitted", "running", "succeeded", "failed", "cancelled")


def job(job_id: str) -> str:
    return JOB_PREFIX + job_id


def idempotency(key: str) -> str:
    return IDEMPOTENCY_PREFIX + key


def rate_log(api_key_id: str) -> str:
    """Sorted set of reserved send moments of one API key."""
    return f"{PREFIX}ratelimit:{api_key_id}:log"


def rate_blocked(api_key_id: str) -> str:
    """Moment until which every send of one API key holds (after an upstream 429)."""
    return f"{PREFIX}ratelimit:{api_key_id}:blocked"


def pause(api_key_id: str) -> str:
    """Hash describing the current pause of one API key, if any."""
    return f"{PREFIX}pause:{api_key_id}"


def recent_answers(api_key_id: str, kind: str) -> str:
    """Sorted set of recent createTask answers of one kind (``455``, ``429``, ``other``)."""
    return f"{PREFIX}recent:{api_key_id}:{kind}"


def held(api_key_id: str) -> str:
    """Set of job ids waiting for one API key: its pause or its budget (schedule's Redis)."""
    return f"{PREFIX}held:{api_key_id}"


def state_index(state: str) -> str:
    """Sorted set of the jobs in one state, scored by when they were created."""
    return f"{PREFIX}jobs:{state}"


def state_indexes() -> list[str]:
    """Every state's index, in the order of :data:`STATES` (the Lua scripts rely on it)."""
    return [state_index(state) for state in STATES]


def task(task_id: str) -> str:
    """The job id an upstream task belongs to (written when the task is accepted)."""
    return f"{PREFIX}task:{task_id}"


def callback_seen(signature_digest: str) -> str:
    """A callback signature already used (replay protection), kept for the time window."""
    return f"{PREFIX}callback:seen:{signature_digest}"


def histogram(name: str) -> str:
    return HISTOGRAM_PREFIX + name
