"""Fleet-wide counters and histograms kept in the broker's Redis.

Workers count here; the HTTP app exports the totals at scrape time (``/metrics``), so
prefork children need no Prometheus multiprocess mode. See docs/operations.md.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from redis.commands.core import Script

from worker import keys
from worker.lua import queue_by_sha
from worker.store.jobs import decode_text

#: Bucket bounds (seconds) of the upstream request latency histograms.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Bucket bounds (seconds) of the end-to-end job time histogram.
JOB_TIME_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 3600.0)
HISTOGRAMS = {
    "create_task_seconds": LATENCY_BUCKETS,
    "record_info_seconds": LATENCY_BUCKETS,
    "job_seconds": JOB_TIME_BUCKETS,
}


class Metrics:
    """Counters and histograms in the broker's Redis, shared by every process of the fleet.

    Workers count here and the HTTP app exports the totals at scrape time, so prefork
    worker processes need no Prometheus multiprocess mode. A counter name may carry one
    label after a colon (``create_task_total:429``). Counting is best effort: a Redis
    error while counting never costs a job.

    Inside :meth:`batched` (a task step), :meth:`count`, :meth:`observe` and
    :meth:`sample` are written together when the step ends, in one round trip.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._local = threading.local()

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """Write what is counted inside together at the end (best effort, like counting)."""
        if getattr(self._local, "pipe", None) is not None:  # the outer batch writes it
            yield
            return
        pipe = self._local.pipe = self.redis.pipeline(transaction=False)
        scripts: list[tuple[int, Script, Sequence[str], Sequence[Any]]] = []
        self._local.scripts = scripts
        try:
            yield
        finally:
            self._local.pipe = None
            if len(pipe):
                with contextlib.suppress(redis.RedisError):
                    _rerun_unloaded(pipe.execute(raise_on_error=False), scripts)

    def best_effort(self, script: Script, script_keys: Sequence[str], args: Sequence[Any]) -> None:
        """Run ``script`` (on this Redis) when its answer is not needed: with the batch's
        writes in one, else now. A Redis error is swallowed, as for counting."""
        batch = getattr(self._local, "pipe", None)
        if batch is None or script.registered_client is not self.redis:
            with contextlib.suppress(redis.RedisError):
                script(keys=script_keys, args=args)
            return
        queue_by_sha(batch, script, script_keys, args)
        self._local.scripts.append((len(batch) - 1, script, script_keys, args))

    @contextlib.contextmanager
    def _writing(self) -> Iterator[redis.client.Pipeline]:
        """The current batch's pipeline, or one of its own sent at once."""
        batch = getattr(self._local, "pipe", None)
        if batch is not None:
            yield batch
            return
        pipe = self.redis.pipeline(transaction=False)
        yield pipe
        with contextlib.suppress(redis.RedisError):
            pipe.execute()

    def incr(self, name: str, amount: int = 1) -> None:
        """Count now, whatever the batch; a Redis error is raised."""
        self.redis.hincrby(keys.METRICS, name, amount)

    def count(self, name: str, amount: int = 1) -> None:
        """Like :meth:`incr`, but a Redis error is swallowed (for hot paths)."""
        with self._writing() as pipe:
            pipe.hincrby(keys.METRICS, name, amount)

    def observe(self, name: str, seconds: float, *, counting: str | None = None) -> None:
        """Add one observation to histogram ``name`` (one of :data:`HISTOGRAMS`), and
        count ``counting`` too in the same round trip."""
        bounds = HISTOGRAMS[name]
        bucket = next((repr(b) for b in bounds if seconds <= b), "+Inf")
        with self._writing() as pipe:
            if counting is not None:
                pipe.hincrby(keys.METRICS, counting, 1)
            pipe.hincrby(keys.histogram(name), bucket, 1)
            pipe.hincrbyfloat(keys.histogram(name), "sum", max(0.0, seconds))
            pipe.hincrby(keys.histogram(name), "count", 1)

    def sample(self, key: str, values: Sequence[float], keep: int) -> None:
        """Keep ``values`` at the head of the list ``key``, which holds the ``keep`` latest."""
        if not values:
            return
        with self._writing() as pipe:
            pipe.lpush(key, *(f"{value:.4f}" for value in values))
            pipe.ltrim(key, 0, keep - 1)

    def read(self) -> dict[str, int]:
        return {decode_text(k): int(v) for k, v in self.redis.hgetall(keys.METRICS).items()}

    def read_histogram(self, name: str) -> tuple[list[tuple[str, int]], float, int]:
        """``([(bound, cumulative count), ..., ("+Inf", total)], sum, count)``."""
        stored = self.redis.hgetall(keys.histogram(name))
        raw = {decode_text(k): decode_text(v) for k, v in stored.items()}
        cumulative, buckets = 0, []
        for bound in [*map(repr, HISTOGRAMS[name]), "+Inf"]:
            cumulative += int(raw.get(bound, 0))
            buckets.append((bound, cumulative))
        return buckets, float(raw.get("sum", 0.0)), int(raw.get("count", 0))


def _rerun_unloaded(
    replies: list[Any], scripts: list[tuple[int, Script, Sequence[str], Sequence[Any]]]
) -> None:
    """Run again, loading it first, each script of a batch that the server did not know
    (it restarted, or failed over, since the script was loaded)."""
    for index, script, script_keys, args in scripts:
        if isinstance(replies[index], redis.exceptions.NoScriptError):
            script(keys=script_keys, args=args)
