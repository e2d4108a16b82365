"""Job records in the result backend's Redis.

One hash per job (``remixq:job:<id>``), each field JSON-encoded, with a TTL.
Every write goes through a Lua script so that it is atomic and so that the
state only moves forward: ``queued -> submitted -> running -> finished``; a
late or duplicated update can never move a finished job. The scripts are the
storage detail; which update to make and when is the tasks' policy.

Besides the public :class:`~worker.models.JobRecord` fields a record keeps a
few internal ones (prefixed ``_``): the last upstream error code, whether the
submit message was sent, and the poll chain's progress.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from worker.models import JobRecord, JobState

KEY_PREFIX = "remixq:"
JOB_KEY = KEY_PREFIX + "job:{}"
IDEMPOTENCY_KEY = KEY_PREFIX + "idem:{}"
SUBMIT_CLAIM_KEY = KEY_PREFIX + "claim:submit:{}"
POLL_BATCH_KEY = KEY_PREFIX + "pollbatch:"
POLL_BATCH_COUNTER_KEY = KEY_PREFIX + "pollbatch-n:{}"
#: Unfinished jobs, scored by the time by which they must show progress.
WATCH_KEY = KEY_PREFIX + "watch"

LAST_ERROR_FIELD = "_last_error"
TASK_SENT_FIELD = "_task_sent"
NEXT_POLL_FIELD = "_next_poll"
REQUEST_FIELD = "_request"
RETRIES_FIELD = "_retries"

# Ranks of the states; a write may keep or raise the rank, never lower it, and
# nothing changes once the rank is 3 (finished).
_STATE_RANKS = "{queued=0, submitted=1, running=2, succeeded=3, failed=3, cancelled=3}"

#: KEYS: job. ARGV: new state or "", ttl, field, value, ... -> 1 written, 0 refused, -1 missing.
_UPDATE = f"""
local rank = {_STATE_RANKS}
local raw = redis.call('HGET', KEYS[1], 'state')
if not raw then return -1 end
local current = rank[cjson.decode(raw)]
if current == 3 then return 0 end
if ARGV[1] ~= '' then
  local wanted = rank[ARGV[1]]
  if wanted == nil or wanted < current then return 0 end
  redis.call('HSET', KEYS[1], 'state', cjson.encode(ARGV[1]))
end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

#: KEYS: job, idempotency (optional). ARGV: job id, ttl, field, value, ...
#: -> {owner, created}: the job id that owns the idempotency key (an older one
#: when the key was seen before) and 1 when a new record was written.
_CREATE = """
if KEYS[2] then
  local owner = redis.call('GET', KEYS[2])
  if owner then return {owner, 0} end
  redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {ARGV[1], 0} end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {ARGV[1], 1}
"""

#: KEYS: job, batch counter. ARGV: batch id prefix ("<due>"), batch size, ttl
#: -> {batch id, 1 when the caller must send the batch's message}.
#: Jobs due in the same slot share a batch of at most ``batch size`` jobs; the
#: job remembers its batch, so it is polled by that batch only (a stale copy of
#: an older batch skips it). The batch set's key is derived from the id here:
#: fine on one Redis server, which is what the broker is.
_ADD_TO_POLL_BATCH = f"""
local n = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
local batch = ARGV[1] .. ':' .. math.floor((n - 1) / tonumber(ARGV[2]))
local members = '{POLL_BATCH_KEY}' .. batch
redis.call('SADD', members, ARGV[4])
redis.call('EXPIRE', members, ARGV[3])
redis.call('HSET', KEYS[1], '{NEXT_POLL_FIELD}', cjson.encode(batch))
if (n - 1) % tonumber(ARGV[2]) == 0 then return {{batch, 1}} end
return {{batch, 0}}
"""

#: A slot's counter is raised to this once its first batch runs; the next job
#: added starts a new batch (this number is a multiple of any batch size used).
CLOSED_SLOT = 1_000_000_000

#: KEYS: batch counter. ARGV: ttl.
_CLOSE_POLL_SLOT = f"""
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n < {CLOSED_SLOT} then redis.call('SET', KEYS[1], {CLOSED_SLOT}, 'EX', ARGV[1]) end
return 1
"""

#: KEYS: job. ARGV: field, amount -> new value, or nil when the job is gone.
_INCREMENT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
return redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
"""

_RECORD_FIELDS = frozenset(JobRecord.model_fields)
#: A poll batch's keys outlive its due time by far; they are deleted once polled.
POLL_BATCH_TTL_S = 3600


def _encode(fields: dict[str, Any]) -> list[str]:
    flat: list[str] = []
    for name, value in fields.items():
        flat += [name, json.dumps(value.value if isinstance(value, JobState) else value)]
    return flat


def decode_text(value: Any) -> str:
    """A Redis reply as text (clients may or may not decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode_fields(raw: dict[Any, Any]) -> dict[str, Any]:
    return {decode_text(k): json.loads(v) for k, v in raw.items()}


def _record_from(fields: dict[str, Any]) -> JobRecord:
    return JobRecord.model_validate({k: v for k, v in fields.items() if k in _RECORD_FIELDS})


class JobStore:
    """Reads and writes job records.

    Parameters:
        client: a redis-py client for the result backend's database.
        ttl_s: how long a record (and an idempotency key) lives after its last write.
    """

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._update = client.register_script(_UPDATE)
        self._create = client.register_script(_CREATE)
        self._add_to_poll_batch = client.register_script(_ADD_TO_POLL_BATCH)
        self._close_poll_slot = client.register_script(_CLOSE_POLL_SLOT)
        self._increment = client.register_script(_INCREMENT)

    def create(self, job_id: str, *, idempotency_key: str | None = None) -> tuple[str, bool]:
        """Create a ``queued`` record. Returns ``(owner_job_id, created)``.

        With an ``idempotency_key`` seen before, nothing is written and the
        earlier job's id comes back; ``created`` is False whenever no new
        record was written (also when ``job_id`` already exists).
        """
        record = JobRecord(job_id=job_id, state=JobState.QUEUED, created_at=time.time())
        keys = [JOB_KEY.format(job_id)]
        if idempotency_key is not None:
            keys.append(IDEMPOTENCY_KEY.format(idempotency_key))
        args: list[str | int] = [job_id, self.ttl_s, *_encode(record.model_dump(mode="json"))]
        owner, created = self._create(keys=keys, args=args)
        return decode_text(owner), bool(created)

    def get(self, job_id: str) -> JobRecord | None:
        """The public record, or None when there is no such job (or it expired)."""
        raw = self.redis.hgetall(JOB_KEY.format(job_id))
        if not raw:
            return None
        return _record_from(_decode_fields(raw))

    def get_internal(self, job_id: str, name: str) -> Any:
        """One internal field (``_last_error`` ...), decoded; None when absent."""
        raw = self.redis.hget(JOB_KEY.format(job_id), name)
        return None if raw is None else json.loads(raw)

    def update(self, job_id: str, state: JobState | None = None, **fields: Any) -> bool:
        """Write ``fields`` (and move to ``state``) unless that would move the job back.

        Returns True when written; False when the job is finished, the state
        would go backwards, or the job does not exist.
        """
        args = [state.value if state else "", self.ttl_s, *_encode(fields)]
        return int(self._update(keys=[JOB_KEY.format(job_id)], args=args)) == 1

    def set_internal(self, job_id: str, name: str, value: Any) -> bool:
        """Write one internal field (``_request`` ...) unless the job has finished."""
        return self.update(job_id, None, **{name: value})

    def increment(self, job_id: str, field: str, amount: int = 1) -> int | None:
        """Atomically add to a counter (``submit_attempts``, ``polls``)."""
        value = self._increment(keys=[JOB_KEY.format(job_id)], args=[field, amount])
        return None if value is None else int(value)

    def expect_progress(self, job_ids: str | list[str], within_s: float) -> None:
        """Note that the jobs must show progress within ``within_s`` seconds (see watchdog)."""
        ids = [job_ids] if isinstance(job_ids, str) else job_ids
        if ids:
            self.redis.zadd(WATCH_KEY, dict.fromkeys(ids, time.time() + within_s))

    def forget_progress(self, job_id: str) -> None:
        """The job finished: the watchdog no longer looks after it."""
        self.redis.zrem(WATCH_KEY, job_id)

    def stalled(self, limit: int) -> list[str]:
        """Up to ``limit`` unfinished jobs whose progress is overdue."""
        ids = self.redis.zrangebyscore(WATCH_KEY, "-inf", time.time(), start=0, num=limit)
        return [decode_text(i) for i in ids]

    def claim_submit(self, job_id: str, lease_s: int) -> bool:
        """Take the right to call createTask for this job for ``lease_s`` seconds."""
        return bool(self.redis.set(SUBMIT_CLAIM_KEY.format(job_id), "1", nx=True, ex=lease_s))

    def submit_claim_ttl(self, job_id: str) -> int:
        """Seconds left on another worker's submit claim (0 when none)."""
        return max(0, int(self.redis.ttl(SUBMIT_CLAIM_KEY.format(job_id))))

    def release_submit(self, job_id: str) -> None:
        self.redis.delete(SUBMIT_CLAIM_KEY.format(job_id))

    def add_to_poll_batch(self, job_id: str, slot: str, batch_size: int) -> tuple[str, bool]:
        """Put the job in a poll batch of time ``slot``; ``(batch id, send its message)``."""
        keys = [JOB_KEY.format(job_id), POLL_BATCH_COUNTER_KEY.format(slot)]
        ttl = POLL_BATCH_TTL_S
        batch, first = self._add_to_poll_batch(keys=keys, args=[slot, batch_size, ttl, job_id])
        return decode_text(batch), bool(first)

    def close_poll_slot(self, slot: str) -> None:
        """Jobs added to ``slot`` from now on go to a new batch (and send its message)."""
        self._close_poll_slot(keys=[POLL_BATCH_COUNTER_KEY.format(slot)], args=[POLL_BATCH_TTL_S])

    def poll_batch(self, batch: str) -> list[JobRecord]:
        """The unfinished jobs of a batch that still belong to it, read in one round trip."""
        members = sorted(decode_text(m) for m in self.redis.smembers(POLL_BATCH_KEY + batch))
        pipe = self.redis.pipeline(transaction=False)
        for job_id in members:
            pipe.hgetall(JOB_KEY.format(job_id))
        jobs = []
        for raw in pipe.execute():
            if not raw:
                continue
            fields = _decode_fields(raw)
            if fields.get(NEXT_POLL_FIELD) != batch:
                continue  # moved on to a later batch, or re-sent by the watchdog
            record = _record_from(fields)
            if not record.finished:
                jobs.append(record)
        return jobs

    def drop_poll_batch(self, batch: str) -> None:
        self.redis.delete(POLL_BATCH_KEY + batch)
