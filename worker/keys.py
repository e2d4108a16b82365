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
