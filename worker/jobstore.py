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
POLL_LEASE_KEY = KEY_PREFIX + "lease:poll:{}:{}"
#: Unfinished jobs, scored by the time by which they must show progress.
WATCH_KEY = KEY_PREFIX + "watch"

LAST_ERROR_FIELD = "_last_error"
TASK_SENT_FIELD = "_task_sent"
POLL_DONE_FIELD = "_poll_done"
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

#: KEYS: job, hop lease. ARGV: hop, lease seconds -> 1 when this hop may run now.
_BEGIN_POLL_HOP = f"""
local rank = {_STATE_RANKS}
local raw = redis.call('HGET', KEYS[1], 'state')
if not raw or rank[cjson.decode(raw)] == 3 then return 0 end
local done = tonumber(redis.call('HGET', KEYS[1], '{POLL_DONE_FIELD}') or '0')
if tonumber(ARGV[1]) <= done then return 0 end
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then return 0 end
return 1
"""

#: KEYS: job, hop lease. ARGV: hop -> marks the hop done (never lowers it).
_END_POLL_HOP = f"""
local done = tonumber(redis.call('HGET', KEYS[1], '{POLL_DONE_FIELD}') or '0')
if redis.call('EXISTS', KEYS[1]) == 1 and tonumber(ARGV[1]) > done then
  redis.call('HSET', KEYS[1], '{POLL_DONE_FIELD}', ARGV[1])
end
redis.call('DEL', KEYS[2])
return 1
"""

#: KEYS: job. ARGV: field, amount -> new value, or nil when the job is gone.
_INCREMENT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
return redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
"""

_RECORD_FIELDS = frozenset(JobRecord.model_fields)


def _encode(fields: dict[str, Any]) -> list[str]:
    flat: list[str] = []
    for name, value in fields.items():
        flat += [name, json.dumps(value.value if isinstance(value, JobState) else value)]
    return flat


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
        self._begin_hop = client.register_script(_BEGIN_POLL_HOP)
        self._end_hop = client.register_script(_END_POLL_HOP)
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
        return _text(owner), bool(created)

    def get(self, job_id: str) -> JobRecord | None:
        """The public record, or None when there is no such job (or it expired)."""
        raw = self.redis.hgetall(JOB_KEY.format(job_id))
        if not raw:
            return None
        fields = {_text(k): json.loads(v) for k, v in raw.items()}
        return JobRecord.model_validate({k: v for k, v in fields.items() if k in _RECORD_FIELDS})

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

    def expect_progress(self, job_id: str, within_s: float) -> None:
        """Note that the job must show progress within ``within_s`` seconds (see watchdog)."""
        self.redis.zadd(WATCH_KEY, {job_id: time.time() + within_s})

    def forget_progress(self, job_id: str) -> None:
        """The job finished: the watchdog no longer looks after it."""
        self.redis.zrem(WATCH_KEY, job_id)

    def stalled(self, limit: int) -> list[str]:
        """Up to ``limit`` unfinished jobs whose progress is overdue."""
        ids = self.redis.zrangebyscore(WATCH_KEY, "-inf", time.time(), start=0, num=limit)
        return [_text(i) for i in ids]

    def claim_submit(self, job_id: str, lease_s: int) -> bool:
        """Take the right to call createTask for this job for ``lease_s`` seconds."""
        return bool(self.redis.set(SUBMIT_CLAIM_KEY.format(job_id), "1", nx=True, ex=lease_s))

    def submit_claim_ttl(self, job_id: str) -> int:
        """Seconds left on another worker's submit claim (0 when none)."""
        return max(0, int(self.redis.ttl(SUBMIT_CLAIM_KEY.format(job_id))))

    def release_submit(self, job_id: str) -> None:
        self.redis.delete(SUBMIT_CLAIM_KEY.format(job_id))

    def begin_poll_hop(self, job_id: str, hop: int, lease_s: int) -> bool:
        """True when poll ``hop`` should run: not done before, not running elsewhere."""
        keys = [JOB_KEY.format(job_id), POLL_LEASE_KEY.format(job_id, hop)]
        return int(self._begin_hop(keys=keys, args=[hop, lease_s])) == 1

    def end_poll_hop(self, job_id: str, hop: int) -> None:
        """Mark ``hop`` done once its successor is scheduled (or the job finished)."""
        keys = [JOB_KEY.format(job_id), POLL_LEASE_KEY.format(job_id, hop)]
        self._end_hop(keys=keys, args=[hop])
