"""Job records and the schedule, in the result backend's Redis.

One hash per job (``remixq:job:<id>``, JSON values, a TTL): the public
:class:`~worker.models.JobRecord` fields and internal ones (prefixed ``_``). Every write is
a Lua script of ``worker/lua``, so it is atomic, the state only moves forward, only the
message with the latest dispatch token acts, and a createTask attempt is opened and
closed around each send. Which update to make and when is the policies'
(:mod:`worker.policies.submit`, :mod:`worker.policies.poll`).

Every job belongs to a tenant and has a priority (docs/tenants.md): the store keeps each
tenant's own state indexes and idempotency keys, and counts each tenant's jobs waiting to
be sent, which ``max_waiting`` bounds when jobs are created.

The design: docs/design.md, "Job records", "The schedule and the dispatcher" and
"createTask attempts".
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from worker import keys
from worker.fields import (
    DEFAULT_PRIORITY,
    DEFAULT_TENANT,
    PRIORITIES,
    check_priority,
    check_tenant,
)
from worker.lua import load_script, queue_by_sha
from worker.models import PROVIDER, JobRecord, JobState, upstream_model

REQUEST_FIELD = "_request"
DISPATCH_FIELD = "_dispatch"
ATTEMPT_FIELD = "_attempt"
#: The send moment granted to the job (its member in the key's budget), until it is used.
GRANT_FIELD = "_grant"
#: The job's spend reservation not yet used by an attempt: ``{"id": member, "at": moment}``.
SPEND_FIELD = "_spend"
RETRIES_FIELD = "_retries"
HOLDS_FIELD = "_holds"
LAST_ERROR_FIELD = "_last_error"
REFUSED_402_FIELD = "_refused_402"
NOTIFY_URL_FIELD = "_notify_url"
#: The images a relay answered at once, kept until the job has finished with them.
RELAY_RESULTS_FIELD = "_relay_results"
#: Source files already uploaded for the job: ``{blob id: {"url": ..., "uploaded_at": ...}}``.
UPLOADS_FIELD = "_uploads"
#: The start of the names of the job's tenant's state indexes (see ``tenant_state.lua``).
TENANT_INDEX_FIELD = "_tenant_index"
#: What a cancelled job's ``fail_msg`` says.
CANCELLED_MESSAGE = "cancelled before it was sent upstream"

_RECORD_FIELDS = frozenset(JobRecord.model_fields)
#: A message may be sent this long after its job was handed out (a publish that retried).
SEND_MARGIN_S = 5.0
#: Jobs of the schedule read per call when looking for stranded jobs after an outage.
STRANDED_PAGE = 1000


def _queue_heads(oldest_waiting: dict[str, float] | None) -> list[str]:
    """The submit and poll queues' oldest waiting send times as script arguments ('' for an
    empty queue), as ``claim_due.lua`` and ``resend_stranded.lua`` take them."""
    waiting = oldest_waiting or {}
    return [repr(waiting[q]) if q in waiting else "" for q in ("submit", "poll")]


def _encoded(fields: dict[str, Any]) -> dict[str, str]:
    """Each field's value as the JSON text a record holds."""
    return {
        name: json.dumps(value.value if isinstance(value, JobState) else value)
        for name, value in fields.items()
    }


def encode_fields(fields: dict[str, Any]) -> list[str]:
    """``name, JSON text, name, JSON text, ...`` as the scripts take fields."""
    return [text for pair in _encoded(fields).items() for text in pair]


def decode_text(value: Any) -> str:
    """A Redis reply as text (clients may or may not decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


_decode_json_text = json.JSONDecoder().decode


def decode_json(value: Any) -> Any:
    """A stored JSON value (bytes or text) as Python.

    The store writes UTF-8 only: decoding the bytes here and the text with the decoder
    itself spares ``json.loads`` its encoding guess and checks, half the cost of reading a
    job's thirty-odd fields.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogatepass")
    return _decode_json_text(value)


def _decode_fields(raw: dict[Any, Any] | Sequence[Any]) -> dict[str, Any]:
    if isinstance(raw, dict):
        pairs = list(raw.items())
    else:
        pairs = list(zip(raw[0::2], raw[1::2], strict=True))
    return {decode_text(k): decode_json(v) for k, v in pairs}


def _accept_call(
    job_id: str, attempt_id: str, task_id: str, poll_in: float, ttl_s: int
) -> tuple[list[str], list[Any]]:
    """The keys and arguments of ``accept.lua``."""
    job_keys = [
        keys.job(job_id),
        keys.SCHEDULE,
        keys.task(task_id),
        keys.state_index(JobState.QUEUED),
        keys.state_index(JobState.SUBMITTED),
        keys.WAITING,
    ]
    return job_keys, [job_id, attempt_id, task_id, poll_in, ttl_s]


def _record_from(fields: dict[str, Any]) -> JobRecord:
    return JobRecord.model_validate({k: v for k, v in fields.items() if k in _RECORD_FIELDS})


def _begun(reply: list[Any]) -> tuple[str, Job | None]:
    """``begin.lua``'s answer: ``("ok", job)`` or ``(reason, None)``."""
    status = decode_text(reply[0])
    if status != "ok":
        return status, None
    return status, Job.from_fields(_decode_fields(reply[1:]))


def read_record(client: redis.Redis, job_id: str) -> tuple[JobRecord, dict[str, Any]] | None:
    """The public record and every field (internal ones too, decoded); None: no such job."""
    raw = client.hgetall(keys.job(job_id))
    if not raw:
        return None
    fields = _decode_fields(raw)
    return _record_from(fields), fields


@dataclass(frozen=True)
class Job:
    """A job as one step sees it: the public record and the internal fields it needs."""

    record: JobRecord
    token: int
    request: Any
    attempt: str | None
    grant: str | None
    spend: dict[str, Any] | None
    retries: int
    holds: int
    last_error: dict[str, Any] | None
    refused_402: int
    uploads: dict[str, Any]
    #: The images a relay answered at once (``RELAY_RESULTS_FIELD``), if it did.
    relay_results: list[str]

    @property
    def job_id(self) -> str:
        return self.record.job_id

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Job:
        return cls(
            record=_record_from(fields),
            token=int(fields.get(DISPATCH_FIELD) or 0),
            request=fields.get(REQUEST_FIELD),
            attempt=fields.get(ATTEMPT_FIELD),
            grant=fields.get(GRANT_FIELD),
            spend=fields.get(SPEND_FIELD),
            retries=int(fields.get(RETRIES_FIELD) or 0),
            holds=int(fields.get(HOLDS_FIELD) or 0),
            last_error=fields.get(LAST_ERROR_FIELD),
            refused_402=int(fields.get(REFUSED_402_FIELD) or 0),
            uploads=dict(fields.get(UPLOADS_FIELD) or {}),
            relay_results=[str(url) for url in fields.get(RELAY_RESULTS_FIELD) or []],
        )


@dataclass(frozen=True)
class NewJob:
    """A job to create with :meth:`JobStore.create_many`."""

    job_id: str
    request: Any
    idempotency_key: str | None = None
    notify_url: str | None = None
    provider: str = PROVIDER
    #: The job this one replays (``remixq retry``).
    retry_of: str | None = None
    tenant: str = DEFAULT_TENANT
    priority: str = DEFAULT_PRIORITY


class QueueFull(Exception):
    """A tenant already has as many jobs waiting to be sent as ``REMIX_TENANT_MAX_WAITING``
    allows, or would have more with the new ones; nothing was written. ``str()`` is one
    line."""

    def __init__(self, tenant: str, waiting: int, limit: int, adding: int) -> None:
        self.tenant = tenant
        self.waiting = waiting
        self.limit = limit
        self.adding = adding
        super().__init__(
            f"tenant {tenant} has {waiting} job(s) waiting to be sent and may have at most "
            f"{limit} (REMIX_TENANT_MAX_WAITING): {adding} more refused; try again later"
        )

    @property
    def excess(self) -> int:
        """How many of the tenant's waiting jobs must be sent before these would fit."""
        return max(1, self.waiting + self.adding - self.limit)


@dataclass(frozen=True)
class Dispatch:
    """A job handed out by the schedule: send its next step with this token."""

    job_id: str
    token: int
    phase: str  # "submit" or "poll"
    request: Any
    due: float
    #: Sent again because the job's previous step was lost (its message, or its worker).
    resent: bool = False


def dispatches(flat: Sequence[Any]) -> list[Dispatch]:
    """The jobs a script handed out (``claim_due.lua``, ``pick.lua``): six entries each."""
    handed = []
    for i in range(0, len(flat), 6):
        request = decode_text(flat[i + 3])
        handed.append(
            Dispatch(
                job_id=decode_text(flat[i]),
                token=int(flat[i + 1]),
                phase=decode_text(flat[i + 2]),
                request=decode_json(request) if request else None,
                due=float(flat[i + 4]),
                resent=decode_text(flat[i + 5]) == "1",
            )
        )
    return handed


def _owned(record: JobRecord, tenant: str | None) -> bool:
    return tenant is None or record.tenant == tenant


@dataclass(frozen=True)
class AttemptStart:
    """The answer to :meth:`JobStore.begin_attempt`.

    ``status``: ``ok`` (send now), ``accepted`` (the job already has its task),
    ``open`` (another attempt may still be in flight; ``settles_in`` seconds left),
    ``await_callback`` (an earlier attempt's outcome is unknown and its callback may still
    come; ``settles_in`` seconds left), ``finished`` or ``missing``. ``counted_unknown``:
    an earlier attempt was just found never to have recorded its outcome. ``spend``: the
    spend reservation the opened attempt consumed (``{"id", "at"}``), if any.
    """

    status: str
    counted_unknown: bool = False
    settles_in: float = 0.0
    spend: dict[str, Any] | None = None


class JobStore:
    """Reads and writes job records and the schedule.

    Parameters:
        client: a redis-py client for the result backend's database.
        ttl_s: how long a record (and an idempotency key) lives after its last write.
        archive: a job that succeeds is put in the archive schedule (``REMIX_ARCHIVE_URL``).
        max_waiting: the most jobs one tenant may have waiting to be sent (``queued``);
            a create that would pass it raises :class:`QueueFull`. None: no limit.
    """

    def __init__(
        self,
        client: redis.Redis,
        ttl_s: int,
        archive: bool = False,
        max_waiting: int | None = None,
    ) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.archive = archive
        self.max_waiting = max_waiting
        database = int(client.connection_pool.connection_kwargs.get("db") or 0)
        #: Where the id of each job that finishes is published (see ``keys.finished_channel``).
        self.finished_channel = keys.finished_channel(database)
        self._create = load_script(client, "create")
        self._claim_due = load_script(client, "claim_due")
        self._begin = load_script(client, "begin")
        self._update = load_script(client, "update")
        self._attempt_begin = load_script(client, "attempt_begin")
        self._attempt_end = load_script(client, "attempt_end")
        self._accept = load_script(client, "accept")
        self._increment = load_script(client, "increment")
        self._release_held = load_script(client, "release_held")
        self._due_now = load_script(client, "due_now")
        self._resend_stranded = load_script(client, "resend_stranded")
        self._cancel = load_script(client, "cancel")
        self._claim = load_script(client, "claim")
        self._release = load_script(client, "release")

    # ------------------------------------------------------------------ creating, reading

    def create(
        self,
        job_id: str,
        request: Any,
        *,
        due_in: float,
        idempotency_key: str | None = None,
        provider: str = PROVIDER,
        notify_url: str | None = None,
        retry_of: str | None = None,
        tenant: str = DEFAULT_TENANT,
        priority: str = DEFAULT_PRIORITY,
        admit: bool = True,
    ) -> tuple[str, bool]:
        """Create a ``queued`` record, waiting in its line (:mod:`worker.store.lines`); the
        schedule hands it out after ``due_in`` seconds if it is still there (its deadline).

        Returns ``(owner_job_id, created)``: with an ``idempotency_key`` the tenant used
        before, nothing is written and the earlier job's id comes back; ``created`` is
        False whenever no new record was written (also when ``job_id`` already exists).
        Raises :class:`QueueFull` when the tenant may not have one more job waiting
        (``admit=False``: no limit, for a record that is failed at once) and
        ``ValueError`` for a bad tenant or priority.
        """
        job = NewJob(
            job_id, request, idempotency_key, notify_url, provider, retry_of, tenant, priority
        )
        return self._created(self._create(*self._create_call([job], due_in, admit)))[0]

    def create_many(
        self,
        jobs: Sequence[NewJob],
        *,
        due_in: float,
        check: Callable[[list[str | None]], None] | None = None,
    ) -> list[tuple[str, bool]]:
        """Create many ``queued`` records in one transaction: all of them, or none.

        ``check`` gets, for each job, the id of the job its idempotency key already names
        (None when it names none) and may raise to write nothing. The keys are WATCHed
        from that read to the write, so no other producer takes one in between. Returns
        ``(owner_job_id, created)`` per job, as :meth:`create` does; raises
        :class:`QueueFull` (nothing written) when a tenant may not have them all waiting.
        """
        idem_keys = [
            keys.idempotency(j.idempotency_key, j.tenant)
            for j in jobs
            if j.idempotency_key is not None
        ]
        call = self._create_call(jobs, due_in)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    owners = self._watch_owners(pipe, jobs, idem_keys)
                    if check is not None:
                        check(owners)
                    pipe.multi()
                    self._create(*call, client=pipe)
                    (reply,) = pipe.execute()
                except redis.WatchError:
                    continue
                return self._created(reply)

    def _created(self, reply: Sequence[Any]) -> list[tuple[str, bool]]:
        """``create.lua``'s answer as ``(owner_job_id, created)`` per job, or QueueFull."""
        if decode_text(reply[0]) == "full":
            tenant, waiting, adding = decode_text(reply[1]), int(reply[2]), int(reply[3])
            raise QueueFull(tenant, waiting, self.max_waiting or 0, adding)
        pairs = zip(reply[1::2], reply[2::2], strict=True)
        return [(decode_text(owner), bool(created)) for owner, created in pairs]

    @staticmethod
    def _watch_owners(pipe: Any, jobs: Sequence[NewJob], idem_keys: list[str]) -> list[str | None]:
        if not idem_keys:
            return [None] * len(jobs)
        pipe.watch(*idem_keys)
        found = iter(pipe.mget(idem_keys))
        owners: list[str | None] = []
        for job in jobs:
            raw = None if job.idempotency_key is None else next(found)
            owners.append(None if raw is None else decode_text(raw))
        return owners

    def _create_call(
        self, jobs: Sequence[NewJob], due_in: float, admit: bool = True
    ) -> tuple[list[str], list[Any]]:
        """The keys and arguments of ``create.lua`` for ``jobs``; ``ValueError`` for a bad
        tenant or priority (they become parts of key names)."""
        limit = self.max_waiting if admit else None
        job_keys = [keys.SCHEDULE, keys.state_index(JobState.QUEUED), keys.WAITING, keys.TENANTS]
        args: list[Any] = [
            self.ttl_s,
            due_in,
            "" if limit is None else limit,
            " ".join(PRIORITIES),
            keys.LINES_PREFIX,
        ]
        for job in jobs:
            tenant, priority = check_tenant(job.tenant), check_priority(job.priority)
            job_keys += [keys.job(job.job_id), keys.tenant_state_index(tenant, JobState.QUEUED)]
            if job.idempotency_key is not None:
                job_keys.append(keys.idempotency(job.idempotency_key, tenant))
            fields = json.dumps(_encoded(self._new_record(job)))
            args += [job.job_id, tenant, priority, "" if job.idempotency_key is None else "1"]
            args.append(fields)
        return job_keys, args

    @staticmethod
    def _new_record(job: NewJob) -> dict[str, Any]:
        """The fields of a new job's record (``create.lua`` adds the times and the token)."""
        record = JobRecord(
            job_id=job.job_id,
            state=JobState.QUEUED,
            provider=job.provider,
            model=upstream_model(job.provider, job.request),
            tenant=job.tenant,
            priority=check_priority(job.priority),
            created_at=0,
            retry_of=job.retry_of,
        )
        # Fields still at their defaults are not written (a reader fills them in): a
        # queued job costs Redis about half the memory.
        fields = record.model_dump(mode="json", exclude={"created_at"}, exclude_defaults=True)
        fields.update(
            job_id=job.job_id,
            state=JobState.QUEUED.value,
            provider=job.provider,
            tenant=job.tenant,
            priority=job.priority,
        )
        fields[REQUEST_FIELD] = job.request
        fields[TENANT_INDEX_FIELD] = keys.tenant_index_prefix(job.tenant)
        if job.notify_url is not None:
            fields[NOTIFY_URL_FIELD] = job.notify_url
        return fields

    def waiting_counts(self) -> dict[tuple[str, str], int]:
        """How many jobs each tenant has waiting to be sent (``queued``), per priority:
        ``{(tenant, priority): count}`` (one read; jobs created before tenants existed are
        not counted)."""
        counts: dict[tuple[str, str], int] = {}
        for field, value in self.redis.hgetall(keys.WAITING).items():
            tenant, _, priority = decode_text(field).rpartition(":")
            if int(value) > 0:
                counts[(tenant, priority)] = int(value)
        return counts

    def idempotency_owner(self, key: str, tenant: str = DEFAULT_TENANT) -> str | None:
        """The id of the job the tenant's ``key`` already names, if any (what ``create``
        would answer)."""
        owner = self.redis.get(keys.idempotency(key, tenant))
        return None if owner is None else decode_text(owner)

    def idempotency_owners(self, idem_keys: Sequence[str], tenant: str) -> list[str | None]:
        """:meth:`idempotency_owner` of many keys of one tenant, in one round trip."""
        if not idem_keys:
            return []
        found = self.redis.mget([keys.idempotency(key, tenant) for key in idem_keys])
        return [None if raw is None else decode_text(raw) for raw in found]

    def get(self, job_id: str) -> JobRecord | None:
        """The public record, or None when there is no such job (or it expired)."""
        raw = self.redis.hgetall(keys.job(job_id))
        return _record_from(_decode_fields(raw)) if raw else None

    def get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        """The records of many jobs in one round trip (None for the missing ones)."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(keys.job(job_id))
        return [_record_from(_decode_fields(raw)) if raw else None for raw in pipe.execute()]

    def get_internal(self, job_id: str, name: str) -> Any:
        """One internal field (``_last_error`` ...), decoded; None when absent."""
        raw = self.redis.hget(keys.job(job_id), name)
        return None if raw is None else decode_json(raw)

    def states(self, job_ids: Sequence[str]) -> list[str | None]:
        """The state of each job (None when missing), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "state")
        return [None if raw is None else decode_json(raw) for raw in pipe.execute()]

    def job_for_task(self, task_id: str) -> str | None:
        """The job an upstream task was recorded for (one read), None when none was."""
        raw = self.redis.get(keys.task(task_id))
        return None if raw is None else decode_text(raw)

    def task_of(self, job_id: str) -> tuple[bool, str | None]:
        """``(the job exists, its upstream task id)`` in one small read (hot in callbacks)."""
        state, task = self.redis.hmget(keys.job(job_id), ["state", "upstream_task_id"])
        return state is not None, None if task is None else decode_json(task)

    def claim(self, key: str, token: str, ttl_s: int) -> bool:
        """Take ``key`` for the holder of ``token`` for ``ttl_s`` seconds, unless another
        holder has it (a callback's signature: one delivery acts on it)."""
        return bool(self._claim(keys=[key], args=[token, ttl_s]))

    def release(self, key: str, token: str) -> bool:
        """Give back ``key`` if ``token`` still holds it; whether it was given back."""
        return bool(self._release(keys=[key], args=[token]))

    def list_by_state(
        self,
        state: JobState,
        limit: int,
        after: tuple[float, str] | None = None,
        *,
        tenant: str | None = None,
    ) -> tuple[list[JobRecord], tuple[float, str] | None]:
        """One page of the jobs in ``state``, oldest first, and the cursor of the next page.

        ``after`` is the ``(created_at, job_id)`` of the last job of the previous page.
        ``tenant``: only that tenant's jobs (its own index; jobs created before tenants
        existed are in none); None: every job. A page costs O(``limit``): the index is
        read from the cursor on; entries of expired records are dropped as they are met.
        """
        index = (
            keys.state_index(state) if tenant is None else keys.tenant_state_index(tenant, state)
        )
        records: list[JobRecord] = []
        position = after
        while True:
            entries = self._index_after(index, position, limit - len(records) + 1)
            if not entries:
                return records, None
            found = self.get_many([job_id for _, job_id in entries])
            pairs = zip(entries, found, strict=True)
            gone = [job_id for (_, job_id), record in pairs if record is None]
            if gone:
                self.redis.zrem(index, *gone)
            for entry, record in zip(entries, found, strict=True):
                if record is None or record.state is not state or not _owned(record, tenant):
                    # Expired, moved on between the two reads, or an index entry left by
                    # an expired record whose id another tenant's job took since.
                    position = entry
                    continue
                if len(records) == limit:
                    return records, position
                records.append(record)
                position = entry

    def _index_after(
        self, index: str, after: tuple[float, str] | None, count: int
    ) -> list[tuple[float, str]]:
        """Up to ``count`` index entries ``(score, job_id)`` strictly after ``after``."""
        low = "-inf" if after is None else repr(after[0])
        raw: list[Any] = self.redis.zrangebyscore(
            index, low, "+inf", 0, count + 50, withscores=True
        )
        entries = [(float(pair[1]), decode_text(pair[0])) for pair in raw]
        return [e for e in entries if after is None or e > after][:count]

    def prune_indexes(self, older_than_s: float) -> int:
        """Drop index entries of jobs created more than ``older_than_s`` ago (their records
        have expired); returns how many were dropped."""
        cutoff = self.redis.time()
        bound = cutoff[0] + cutoff[1] / 1e6 - older_than_s
        tenants = sorted(decode_text(name) for name in self.redis.smembers(keys.TENANTS))
        indexes = keys.state_indexes() + [
            keys.tenant_state_index(tenant, state) for tenant in tenants for state in keys.STATES
        ]
        pipe = self.redis.pipeline(transaction=False)
        for index in indexes:
            pipe.zremrangebyscore(index, "-inf", bound)
        return sum(int(n) for n in pipe.execute())

    def count_by_state(self) -> dict[str, int]:
        """How many jobs each state's index holds (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for index in keys.state_indexes():
            pipe.zcard(index)
        return dict(zip(keys.STATES, map(int, pipe.execute()), strict=True))

    # ------------------------------------------------------------------ the schedule

    def claim_due(
        self, limit: int, lease_s: float, *, oldest_waiting: dict[str, float] | None = None
    ) -> list[Dispatch]:
        """Up to ``limit`` due jobs, each with a new dispatch token and a lease.

        ``oldest_waiting``: queue name -> send time of its oldest waiting message, for the
        queues that hold any; a job whose latest message may still be waiting there is
        left to it (see ``claim_due.lua``).
        """
        args = [keys.JOB_PREFIX, limit, lease_s, *_queue_heads(oldest_waiting), SEND_MARGIN_S]
        flat = self._claim_due(keys=[keys.SCHEDULE], args=args)
        return dispatches(flat)

    def due_now(self, job_ids: Iterable[str]) -> int:
        """Make jobs of the schedule due at once: no message of theirs is on its way."""
        ids = list(job_ids)
        if not ids:
            return 0
        return int(self._due_now(keys=[keys.SCHEDULE], args=[keys.JOB_PREFIX, *ids]))

    def resend_stranded(
        self,
        lease_s: float,
        *,
        handed_out_before: float | None = None,
        oldest_waiting: dict[str, float] | None = None,
        page: int = STRANDED_PAGE,
    ) -> int:
        """After an outage: make due at once the jobs whose message was handed out before
        ``handed_out_before`` (fleet clock; None: now), has not begun and cannot still be
        waiting in its queue; returns how many (see ``resend_stranded.lua``)."""
        before = "" if handed_out_before is None else repr(handed_out_before)
        args = [keys.JOB_PREFIX, lease_s, before, *_queue_heads(oldest_waiting), SEND_MARGIN_S]
        made_due = skip = 0
        while True:
            due, read = self._resend_stranded(keys=[keys.SCHEDULE], args=[*args, skip, page])
            made_due += int(due)
            skip += int(read) - int(due)
            if int(read) < page:
                return made_due

    def server_run_id(self) -> str | None:
        """The job store server's run id: it changes when the server restarts or fails over
        (and may then have lost its last writes). None where the server does not tell
        (``INFO`` disabled or renamed, as some hosted services do)."""
        try:
            run_id = self.redis.info("server").get("run_id")
        except redis.ResponseError:
            return None
        return str(run_id) if run_id else None

    def scheduled(self, job_id: str) -> float | None:
        """When the job's next step is due (None when it is not in the schedule)."""
        score = self.redis.zscore(keys.SCHEDULE, job_id)
        return None if score is None else float(score)

    def schedule_size(self) -> int:
        return int(self.redis.zcard(keys.SCHEDULE))

    # ------------------------------------------------------------------ steps

    def begin(
        self, job_id: str, token: int, lease_s: float, *, poll: bool = False
    ) -> tuple[str, Job | None]:
        """Start a step with ``token``: ``("ok", job)``, or ``(reason, None)``.

        Reasons: ``missing``, ``finished``, ``stale`` (a newer message owns the job).
        ``poll``: a poll step, which counts the job's poll when it has a task to ask about.
        """
        job_keys, args = self._begin_call(job_id, token, lease_s, poll)
        return _begun(self._begin(keys=job_keys, args=args))

    def _begin_call(
        self, job_id: str, token: int, lease_s: float, poll: bool
    ) -> tuple[list[str], list[Any]]:
        """The keys and arguments of ``begin.lua``."""
        return [keys.job(job_id), keys.SCHEDULE], [
            job_id,
            token,
            lease_s,
            self.ttl_s,
            "poll" if poll else "",
        ]

    def begin_reading(
        self, job_id: str, token: int, lease_s: float, other: str
    ) -> tuple[str, Job | None, dict[Any, Any]]:
        """:meth:`begin` (of a submit step), and the hash ``other`` of the same Redis
        read in the same round trip (what a step looks at next: its key's pause)."""
        pipe = self.redis.pipeline(transaction=False)
        queue_by_sha(pipe, self._begin, *self._begin_call(job_id, token, lease_s, False))
        pipe.hgetall(other)
        try:
            reply, fields = pipe.execute()
        except redis.exceptions.NoScriptError:  # the begin did not run: load it, then both
            status, job = self.begin(job_id, token, lease_s)
            return status, job, self.redis.hgetall(other)
        return (*_begun(reply), fields)

    def begin_many(
        self, steps: Sequence[tuple[str, int]], lease_s: float, *, poll: bool = False
    ) -> list[tuple[str, Job | None]]:
        """:meth:`begin` for each ``(job id, token)``, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id, token in steps:
            queue_by_sha(pipe, self._begin, *self._begin_call(job_id, token, lease_s, poll))
        try:
            replies = pipe.execute()
        except redis.exceptions.NoScriptError:  # none of them ran: load it, begin each
            return [self.begin(job_id, token, lease_s, poll=poll) for job_id, token in steps]
        return [_begun(reply) for reply in replies]

    def update(
        self,
        job_id: str,
        state: JobState | None = None,
        *,
        token: int | None = None,
        due_in: float | None = None,
        **fields: Any,
    ) -> int:
        """Write ``fields`` (and move to ``state``); see ``update.lua`` for the answer."""
        args = self._update_args(job_id, state, token, due_in, fields)
        return int(self._update(keys=self._finishing_keys(job_id), args=args))

    def _update_args(
        self,
        job_id: str,
        state: JobState | None,
        token: int | None,
        due_in: float | None,
        fields: dict[str, Any],
    ) -> list[Any]:
        return [
            job_id,
            self.ttl_s,
            state.value if state else "",
            "" if token is None else token,
            "" if due_in is None else max(0.0, due_in),
            self.finished_channel,
            "1" if self.archive else "",
            *encode_fields(fields),
        ]

    @staticmethod
    def _finishing_keys(job_id: str) -> list[str]:
        return [
            keys.job(job_id),
            keys.SCHEDULE,
            *keys.state_indexes(),
            keys.NOTIFY_SCHEDULE,
            keys.ARCHIVE_SCHEDULE,
            keys.WAITING,
        ]

    def cancel(self, job_id: str) -> str:
        """Cancel a job never sent upstream; see ``cancel.lua`` for the answers."""
        args = [job_id, self.ttl_s, self.finished_channel, json.dumps(CANCELLED_MESSAGE)]
        return decode_text(self._cancel(keys=self._finishing_keys(job_id), args=args))

    def park(self, job: Job, due_in: float, state: JobState | None = None, **fields: Any) -> bool:
        """Schedule the job's next step in ``due_in`` seconds (if ``job``'s token is current)."""
        return self.update(job.job_id, state, token=job.token, due_in=due_in, **fields) == 1

    def finish(self, job_id: str, state: JobState, **fields: Any) -> bool:
        """Move a job to a final state; False (nothing changed) when it had finished."""
        return self.update(job_id, state, **fields) == 1

    def finish_reading(
        self, job_id: str, state: JobState, **fields: Any
    ) -> tuple[bool, tuple[JobRecord, dict[str, Any]] | None]:
        """:meth:`finish`, and the record as it is then (:func:`read_record`), in one
        round trip."""
        pipe = self.redis.pipeline(transaction=False)
        args = self._update_args(job_id, state, None, None, fields)
        queue_by_sha(pipe, self._update, self._finishing_keys(job_id), args)
        pipe.hgetall(keys.job(job_id))
        try:
            answer, raw = pipe.execute()
        except redis.exceptions.NoScriptError:  # the update did not run: load it and do both
            return self.finish(job_id, state, **fields), read_record(self.redis, job_id)
        if not raw:
            return int(answer) == 1, None
        decoded = _decode_fields(raw)
        return int(answer) == 1, (_record_from(decoded), decoded)

    def set_internal(self, job_id: str, name: str, value: Any) -> bool:
        """Write one internal field unless the job has finished."""
        return self.update(job_id, None, **{name: value}) == 1

    def increment(self, job_id: str, field: str, amount: int = 1) -> int | None:
        """Add to a counter of an unfinished job; None when it is missing or finished."""
        value = self._increment(keys=[keys.job(job_id)], args=[field, amount, self.ttl_s])
        return None if value is None else int(value)

    # ------------------------------------------------------------------ createTask attempts

    @staticmethod
    def new_attempt_id() -> str:
        return uuid.uuid4().hex

    def begin_attempt(
        self,
        job_id: str,
        attempt_id: str,
        settle_s: float,
        *,
        settle_only: bool = False,
        callback_wait_s: float = 0.0,
        held_for: str | None = None,
    ) -> AttemptStart:
        """Open an attempt before createTask is sent (see ``attempt_begin.lua``).

        With ``settle_only`` nothing is opened: an earlier attempt that has settled is
        closed as unknown, and ``ok`` means that none is open any more. With a
        ``callback_wait_s``, no attempt opens within that time after an unknown outcome.
        ``held_for``: the key id whose held jobs an opened attempt leaves (:meth:`unhold`).
        """
        mode = "settle" if settle_only else "open"
        job_keys = [keys.job(job_id)] + ([keys.held(held_for)] if held_for else [])
        reply = self._attempt_begin(
            keys=job_keys, args=[attempt_id, settle_s, self.ttl_s, mode, callback_wait_s, job_id]
        )
        status = decode_text(reply[0])
        if status == "ok":
            spend = decode_json(reply[2]) if len(reply) > 2 else None
            return AttemptStart(status, counted_unknown=int(reply[1]) == 1, spend=spend)
        if status == "open":
            return AttemptStart(status, settles_in=float(reply[1]))
        if status == "await_callback":
            return AttemptStart(
                status, counted_unknown=int(reply[2]) == 1, settles_in=float(reply[1])
            )
        return AttemptStart(status)

    def end_attempt(self, job_id: str, attempt_id: str, *, unknown: bool, **fields: Any) -> bool:
        """Close an attempt that created no known task; True when it was open and ours."""
        args = [attempt_id, "1" if unknown else "0", self.ttl_s, *encode_fields(fields)]
        return int(self._attempt_end(keys=[keys.job(job_id)], args=args)) == 1

    def accept(self, job_id: str, attempt_id: str, task_id: str, poll_in: float) -> str:
        """Record an accepted upstream task (see ``accept.lua`` for the answers)."""
        job_keys, args = _accept_call(job_id, attempt_id, task_id, poll_in, self.ttl_s)
        return decode_text(self._accept(keys=job_keys, args=args))

    def accept_replicated(
        self, job_id: str, attempt_id: str, task_id: str, poll_in: float, wait_ms: int
    ) -> tuple[str, int]:
        """:meth:`accept`, then wait up to ``wait_ms`` for a replica to have it (``WAIT``).

        Returns the answer and how many replicas acknowledged. Both go in one pipeline, so
        a connection lost before the acknowledgement (the primary died) sends both again
        to the server the client reconnects to: after a failover, the new primary. The
        acceptance is recorded again there if the old primary had not passed it on.
        """
        job_keys, args = _accept_call(job_id, attempt_id, task_id, poll_in, self.ttl_s)
        pipe = self.redis.pipeline(transaction=False)
        self._accept(keys=job_keys, args=args, client=pipe)
        pipe.execute_command("WAIT", 1, wait_ms)
        outcome, replicas = pipe.execute()
        return decode_text(outcome), int(replicas)

    # ------------------------------------------------------------------ jobs held by a pause

    def hold(self, api_key_id: str, job_id: str) -> None:
        """Note that the job waits for ``api_key_id`` (its pause, or its budget)."""
        self.redis.sadd(keys.held(api_key_id), job_id)

    def release_held(self, api_key_id: str, spread_s: float, deadline_s: float) -> int:
        """Put the jobs held for the key back in their lines (``deadline_s``: from a job's
        creation to its submit deadline); any other becomes due within ``spread_s``."""
        args = [spread_s, keys.JOB_PREFIX, keys.LINES_PREFIX, deadline_s]
        return int(self._release_held(keys=[keys.held(api_key_id), keys.SCHEDULE], args=args))
