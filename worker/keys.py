"""Every Redis key remixq uses, in one place.

Job records, the schedule and idempotency keys live in the result backend's Redis
(``RESULT_BACKEND_URL``); the per-key fleet state (budget, pause, breaker, metrics) lives in
the broker's Redis (``REDIS_URL``), which every worker shares. By default both are the same
server. The Lua scripts in ``worker/lua`` receive these keys as ``KEYS``; the only key a script
derives itself are a job's hash from ``JOB_PREFIX`` (in ``claim_due.lua`` and
``claim_notify.lua``), a webhook receiver's keys from ``NOTIFY_RECEIVER_PREFIX`` and
``NOTIFY_BUSY_PREFIX`` (in ``claim_notify.lua``), and a tenant's state indexes from the
prefix a job's record holds (:func:`tenant_index_prefix`, in ``tenant_state.lua``) and the
waiting lines' keys from :data:`LINES_PREFIX` (in ``lines.lua`` and ``pick.lua``), which
is fine on the single Redis server the pipeline runs on.
"""

from __future__ import annotations

from worker.fields import DEFAULT_TENANT

PREFIX = "remixq:"

#: One hash per job: the public record's fields and internal ones (``_request`` ...).
JOB_PREFIX = PREFIX + "job:"
#: Sorted set of unfinished jobs, scored by when their next step is due (Redis clock).
SCHEDULE = PREFIX + "schedule"
IDEMPOTENCY_PREFIX = PREFIX + "idem:"
#: Every tenant's own keys start with ``<TENANT_PREFIX><tenant>:`` (a tenant name holds no
#: ``:``, so no two tenants' keys, nor the default tenant's idempotency keys, can meet).
TENANT_PREFIX = PREFIX + "tenant:"
#: Set of the tenants that have had jobs (whose state indexes ``prune_indexes`` prunes).
TENANTS = PREFIX + "tenants"
#: Hash: ``<tenant>:<priority>`` (:func:`waiting_field`) -> how many of the tenant's jobs of
#: that priority are ``queued``, not yet accepted upstream (admission control,
#: ``REMIX_TENANT_MAX_WAITING``). ``create.lua`` adds, ``tenant_state.lua`` takes away.
WAITING = PREFIX + "waiting"
#: Ids of the API keys workers use (hash: key id -> its rate limit), never the keys.
KNOWN_API_KEYS = PREFIX + "keys"
#: Spend caps of the API keys workers use (hash: key id -> its ``REMIX_SPEND_CAP``).
KNOWN_SPEND_CAPS = PREFIX + "keys:spend_caps"
#: Counters (hash): pauses by reason, unknown createTask outcomes, ...
METRICS = PREFIX + "metrics"
#: Recent poll lateness samples, for the benchmark.
POLL_LATENESS = PREFIX + "stats:poll_lateness"
#: Sorted set of finished jobs whose completion webhook is due, scored by when.
NOTIFY_SCHEDULE = PREFIX + "notify"
#: One hash per webhook receiver (``scheme://host:port``): ``streak`` of deliveries it
#: answered with a 2xx in a row (0 after a failure), which sets how many may be in flight.
NOTIFY_RECEIVER_PREFIX = PREFIX + "notify:receiver:"
#: One sorted set per webhook receiver: the jobs whose delivery is in flight there,
#: scored by when their lease ends.
NOTIFY_BUSY_PREFIX = PREFIX + "notify:busy:"
#: Sorted set of every webhook delivery in flight, scored by when its lease ends.
NOTIFY_IN_FLIGHT = PREFIX + "notify:in_flight"
#: Sorted set of live workers, scored by their last heartbeat (Redis clock).
WORKERS = PREFIX + "workers"
#: Sorted set of ``"<worker> <pool size>"``, scored by the worker's last heartbeat: how
#: many task slots the fleet has (webhooks may hold at most half of them).
WORKER_SLOTS = PREFIX + "workers:slots"
#: Sorted set of ``"<worker> <queue>,<queue>..."``, scored by the worker's last heartbeat:
#: which queues the live fleet consumes (a queue no live worker consumes is reported).
WORKER_QUEUES = PREFIX + "workers:queues"
#: Histograms (one hash each: bucket bound -> count, plus ``sum`` and ``count``).
HISTOGRAM_PREFIX = PREFIX + "hist:"
#: Job states in the order of their index keys (see :func:`state_indexes`).
STATES = ("queued", "submitted", "running", "succeeded", "failed", "cancelled")


def job(job_id: str) -> str:
    return JOB_PREFIX + job_id


def idempotency(key: str, tenant: str = DEFAULT_TENANT) -> str:
    """A producer's idempotency key, in its tenant's namespace (two tenants' equal keys
    are two keys). The default tenant's keys keep the name they had before tenants."""
    if tenant == DEFAULT_TENANT:
        return IDEMPOTENCY_PREFIX + key
    return f"{TENANT_PREFIX}{tenant}:idem:{key}"


def waiting_field(tenant: str, priority: str) -> str:
    """A tenant and priority's field in :data:`WAITING` (``create.lua`` builds the same)."""
    return f"{tenant}:{priority}"


def tenant_index_prefix(tenant: str) -> str:
    """The start of a tenant's state indexes' names: the state follows (a job's record
    holds it, so the scripts that move the job find its tenant's indexes)."""
    return f"{TENANT_PREFIX}{tenant}:jobs:"


def tenant_state_index(tenant: str, state: str) -> str:
    """Sorted set of one tenant's jobs in one state, scored by when they were created."""
    return tenant_index_prefix(tenant) + state


def rate_log(api_key_id: str) -> str:
    """Sorted set of reserved send moments of one API key."""
    return f"{PREFIX}ratelimit:{api_key_id}:log"


def rate_blocked(api_key_id: str) -> str:
    """Moment until which every send of one API key holds (after an upstream 429)."""
    return f"{PREFIX}ratelimit:{api_key_id}:blocked"


def spend_log(api_key_id: str) -> str:
    """Sorted set of the spend reservations of one API key (createTasks that were or may
    be accepted), scored by their moment; a refused attempt's member is removed."""
    return f"{PREFIX}spend:{api_key_id}:log"


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


def notify_receiver(receiver: str) -> str:
    """State of one webhook receiver (``scheme://host:port``, as ``claim_notify.lua`` names it)."""
    return NOTIFY_RECEIVER_PREFIX + receiver


def notify_busy(receiver: str) -> str:
    """The deliveries in flight to one webhook receiver."""
    return NOTIFY_BUSY_PREFIX + receiver


def histogram(name: str) -> str:
    return HISTOGRAM_PREFIX + name


def finished_channel(database: int) -> str:
    """Pub/sub channel on which the id of every job that finishes is published (long polls).

    Pub/sub ignores the database number, so the channel names the job store's database:
    deployments (or tests) sharing one Redis server do not hear each other's jobs.
    """
    return f"{PREFIX}finished:{database}"


def blob(blob_id: str) -> str:
    """The bytes of one source image a producer stored for a job (:mod:`worker.store.blobs`)."""
    return f"{PREFIX}blob:{blob_id}"


#: Sorted set of succeeded jobs whose result images are to be archived, scored by when
#: their next try is due (``REMIX_ARCHIVE_URL``; :mod:`worker.store.archive`).
ARCHIVE_SCHEDULE = PREFIX + "archive"
#: Sorted set of every archive step in flight, scored by when its lease ends (they count
#: in the webhooks' fleet-wide limit, :data:`NOTIFY_IN_FLIGHT`).
ARCHIVE_IN_FLIGHT = PREFIX + "archive:in_flight"
#: Sorted set of the stored blobs' ids, scored by when they expire (Redis clock).
BLOB_EXPIRIES = PREFIX + "blobs:expiries"
#: Hash: blob id -> its size in bytes (the blobs counted in :data:`BLOB_BYTES`).
BLOB_SIZES = PREFIX + "blobs:sizes"
#: The total bytes of the stored blobs, which ``REMIX_BLOB_MAX_BYTES`` caps.
BLOB_BYTES = PREFIX + "blobs:bytes"


def provider_workers(provider: str) -> str:
    """Sorted set of the worker processes that can send ``provider``'s jobs, scored by
    their last heartbeat (a job another worker could send waits for one of them)."""
    return f"{PREFIX}workers:provider:{provider}"


#: Prefix of every provider's waiting lines (:mod:`worker.store.lines`): the jobs waiting
#: for a send moment of their provider's key. Under ``LINES_PREFIX + provider + ":"``:
#: ``<priority>:<tenant>`` (sorted set: job id -> its place, when it was created),
#: ``<priority>`` (sorted set: tenant -> its pass, the fair share's virtual time),
#: ``passes`` (hash: ``<priority>`` -> the class's virtual time, ``<priority>:<tenant>`` ->
#: an idle tenant's last pass), ``count`` (jobs waiting in every line) and
#: ``picks:<minute>`` (hash: ``<priority>:<tenant>`` -> jobs picked in that minute).
#: ``lines.lua`` and ``pick.lua`` derive these names from the prefix and the job's fields.
LINES_PREFIX = PREFIX + "lines:"


def lines_base(provider: str) -> str:
    """The prefix of one provider's waiting lines (see :data:`LINES_PREFIX`)."""
    return f"{LINES_PREFIX}{provider}:"


def line(provider: str, priority: str, tenant: str) -> str:
    """The jobs of one tenant and priority waiting for ``provider``'s key, by place."""
    return f"{lines_base(provider)}{priority}:{tenant}"


def line_tenants(provider: str, priority: str) -> str:
    """The tenants with jobs waiting in one priority class, scored by their pass."""
    return f"{lines_base(provider)}{priority}"


def lines_count(provider: str) -> str:
    """How many jobs wait in every line of ``provider``."""
    return f"{lines_base(provider)}count"


def lines_picks(provider: str, minute: int) -> str:
    """Jobs picked per ``<priority>:<tenant>`` during one minute (Unix time // 60)."""
    return f"{lines_base(provider)}picks:{minute}"


def rate_pending(api_key_id: str) -> str:
    """Sorted set of send moments granted and not yet used (member -> when it expires)."""
    return f"{PREFIX}ratelimit:{api_key_id}:pending"


def rate_pace(api_key_id: str) -> str:
    """When the next paced send moment of one API key comes (a backlog is paced)."""
    return f"{PREFIX}ratelimit:{api_key_id}:pace"
