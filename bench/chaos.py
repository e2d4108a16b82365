"""The chaos suite: many jobs through a fleet under faults of every kind; count what broke.

``python -m bench.chaos`` (``make chaos``) runs three scenarios of the same jobs, each on
fresh processes:

* **clean**: no faults; the baseline.
* **storm**: ~6 % random 455s and ~6 % random 429s on createTask. Stray ones must not
  stall the fleet; its throughput is compared with the clean run's.
* **chaos**: ~20 % faults on both endpoints (429, 455 and 500 as JSON status, JSON body
  or a non-JSON page; connection resets; cut bodies; accept-then-drop; accept-then-gateway
  timeout page), two worker
  SIGKILLs (each replaced), a restart of the job store's Redis (append-only file), and a
  broker outage of several seconds.

Then the **failover** scenario of :mod:`bench.failover` (the Redis primary SIGKILLed,
Sentinel promotes its replica), without and with ``REMIX_ACCEPT_WAIT_MS``.

Every scenario checks: every job succeeded (lost = 0); the sandbox accepted each job's
createTask once, except where it reports the answer as ambiguous (then the record must
say ``possibly_paid_twice``); no secret in any log, Redis key or value, or result. With
``--write-docs`` the figures replace the "Latest run" section of ``docs/reliability.md``.

The broker and the job store are two private ``redis-server`` processes with an
append-only file, so each can fail on its own; everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from bench.report import machine_info, now_utc
from sandbox.control import SandboxControl
from sandbox.launch import (
    REPO_ROOT,
    ManagedProcess,
    RedisServer,
    sigterm_as_interrupt,
    start_redis,
    start_sandbox,
    start_worker,
)
from worker import keys
from worker.models import JobRecord
from worker.store.connection import connect
from worker.store.jobs import ATTEMPT_FIELD, decode_text

DEFAULT_DOCS = REPO_ROOT / "docs" / "reliability.md"
LATEST_RUN_HEADING = "## Latest run"
GENERATION_S = 1.0
SOURCE_IMAGE = "https://example.com/remixq-chaos/source.png"
REFERENCE_IMAGE = "https://example.com/remixq-chaos/character.png"
#: Settings of the workers: quick polls and backoffs, a short request deadline (so a short
#: lease: a SIGKILLed worker's jobs are sent again about 25 s later), no budget in the way.
WORKER_SETTINGS = {
    "REMIX_POLL_INITIAL_S": "0.5",
    "REMIX_POLL_MAX_S": "2",
    "REMIX_RETRY_BASE_S": "0.1",
    "REMIX_RETRY_MAX_S": "2",
    "REMIX_MAX_RETRIES": "10",
    "REMIX_DEADLINE_S": "300",
    "REMIX_PAUSE_PROBE_S": "1",
    "KIE_REQUEST_DEADLINE_S": "10",
    "KIE_READ_TIMEOUT_S": "8",
    "KIE_RATE_LIMIT": "1000/1s",
}
CLEAN: dict[str, Any] = {
    "faults": {},
    "fault_style": "http",
    "fault_endpoints": ["createTask", "recordInfo"],
    "reset_rate": 0.0,
    "html_rate": 0.0,
    "cut_rate": 0.0,
    "drop_rate": 0.0,
    "gateway_rate": 0.0,
    "slow_rate": 0.0,
}
STORM: dict[str, Any] = {
    **CLEAN,
    "faults": {455: 0.06, 429: 0.06},
    "fault_endpoints": ["createTask"],
}
CHAOS: dict[str, Any] = {
    **CLEAN,
    "faults": {429: 0.05, 455: 0.04, 500: 0.05},
    "fault_style": "mixed",
    "reset_rate": 0.02,
    "html_rate": 0.01,
    "cut_rate": 0.02,
    "drop_rate": 0.02,
    "gateway_rate": 0.01,
    # Slow answers keep workers busy, so that a SIGKILL catches steps in flight.
    "slow_rate": 0.3,
    "slow_seconds": 2.0,
}
#: Writes of the job store are paused at most this long while a worker is killed.
WRITE_PAUSE_MS = 3000
SAMPLE_S = 0.5
REDIS_DOWN_S = 3.0


@dataclass(frozen=True)
class Scenario:
    """One run: its faults and what happens to the processes."""

    name: str
    sandbox: dict[str, Any]
    kills: int = 0
    store_restart: bool = False
    broker_outage_s: float = 0.0
    #: Enqueue the jobs over about this long (0: all at once), so that every process fault
    #: lands while jobs are in flight.
    stretch_s: float = 0.0


SCENARIOS = {
    "clean": Scenario("clean", CLEAN),
    "storm": Scenario("storm", STORM),
    "chaos": Scenario(
        "chaos",
        {**CHAOS, "generation_seconds": 4.0},
        kills=2,
        store_restart=True,
        broker_outage_s=8.0,
        stretch_s=150.0,
    ),
}
#: The scenario of :mod:`bench.failover` (the Redis primary fails over), run after these.
FAILOVER = "failover"
#: When each process fault happens, as a share of the scenario's stretch.
EVENT_TIMES = {"kill-1": 0.12, "store": 0.32, "broker": 0.52, "kill-2": 0.75}


@dataclass
class Outcome:
    """What one scenario measured."""

    scenario: str
    jobs: int
    seconds: float = 0.0
    states: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    accepted_twice: int = 0
    paid_twice_unflagged: int = 0
    ambiguous: int = 0
    flagged_possibly_twice: int = 0
    unknown_outcomes: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    store_restarts: int = 0
    broker_outage_s: float = 0.0
    moved_again_after_kill_s: list[float] = field(default_factory=list)
    moved_again_after_outage_s: list[float] = field(default_factory=list)
    #: How many unfinished jobs each of those figures watched.
    watched_after_kill: list[int] = field(default_factory=list)
    watched_after_outage: list[int] = field(default_factory=list)
    pauses: int = 0
    #: Records whose tenant or priority is not what the producer asked for.
    mixed_up: int = 0
    leaks: list[str] = field(default_factory=list)
    #: Jobs that did not move after a kill or an outage within the limit, with their fields.
    stuck: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> bool:
        return (
            self.states == Counter({"succeeded": self.jobs})
            and self.lost == 0
            and self.paid_twice_unflagged == 0
            and self.mixed_up == 0
            and not self.leaks
        )


class Fleet:
    """The processes of one scenario; everything started is stopped by :meth:`close`."""

    def __init__(self, log_dir: Path, workers: int, concurrency: int) -> None:
        self.log_dir = log_dir
        self.api_key = f"sk-chaos-{uuid.uuid4().hex}"
        self.concurrency = concurrency
        self.broker = start_redis(
            append_only_dir=log_dir / "broker", log_path=log_dir / "broker.log"
        )
        self.store = start_redis(append_only_dir=log_dir / "store", log_path=log_dir / "store.log")
        self.sandbox = start_sandbox(
            args=["--api-key", self.api_key, "--generation-seconds", str(GENERATION_S)],
            log_path=log_dir / "sandbox.log",
        )
        assert self.sandbox.url is not None
        self.control = SandboxControl(self.sandbox.url)
        self.workers: list[ManagedProcess] = []
        self.killed: list[ManagedProcess] = []
        for _ in range(workers):
            self.start_worker()

    def start_worker(self) -> ManagedProcess:
        env = {
            "REDIS_URL": self.broker.url,
            "RESULT_BACKEND_URL": self.store.url,
            "KIE_API_KEY": self.api_key,
            "KIE_BASE_URL": self.sandbox.url or "",
            **WORKER_SETTINGS,
        }
        process = start_named_worker(self.log_dir, "chaos", self.concurrency, env)
        self.workers.append(process)
        return process

    def store_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.store.url)

    def restart(self, server: RedisServer, down_s: float) -> RedisServer:
        """Shut a Redis server down (its AOF keeps every write) and start it again."""
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        directory = self.log_dir / ("broker" if server is self.broker else "store")
        with contextlib.suppress(redis.ConnectionError):
            _admin(server.url).shutdown()
        server.process.popen.wait(10)
        time.sleep(down_s)
        restarted = start_redis(
            port, append_only_dir=directory, log_path=directory.with_suffix(".log")
        )
        if server is self.broker:
            self.broker = restarted
        else:
            self.store = restarted
        return restarted

    def kill_a_worker(self, watcher: Watcher) -> tuple[float, dict[str, tuple[Any, ...]]]:
        """SIGKILL the oldest live worker at a moment no createTask is in flight; replace it.

        Returns the moment of the kill and every unfinished job's state at that moment.
        """
        victim = self.workers.pop(0)
        with _between_create_tasks(self.store.url):
            before = watcher.signatures()
            killed_at = time.monotonic()
            victim.kill()
        self.killed.append(victim)
        self.start_worker()
        return killed_at, before

    def logs(self) -> list[Path]:
        return [p for w in self.workers + self.killed if (p := w.log_path) is not None]

    def close(self) -> None:
        for process in [*self.workers, self.sandbox]:
            process.stop()
        self.control.close()
        for server in (self.broker, self.store):
            server.process.stop()


def start_named_worker(
    log_dir: Path, prefix: str, concurrency: int, env: Mapping[str, str | None]
) -> ManagedProcess:
    """A worker named ``<prefix>-<hex>@<host>``, logging to ``log_dir/<prefix>-<hex>.log``."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    return start_worker(
        env, concurrency=concurrency, hostname=f"{name}@%h", log_path=log_dir / f"{name}.log"
    )


def _admin(url: str) -> redis.Redis:
    """A client that fails at once instead of retrying (for PAUSE and SHUTDOWN)."""
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))


def _any_attempt_open(client: redis.Redis) -> bool:
    for key in client.scan_iter(match=keys.JOB_PREFIX + "*", count=1000):
        raw = client.hget(key, ATTEMPT_FIELD)
        if raw is not None and json.loads(raw) is not None:
            return True
    return False


@contextlib.contextmanager
def _between_create_tasks(store_url: str) -> Iterator[None]:
    """Pause the job store's writes at a moment when no createTask attempt is open.

    A worker killed then is not between an upstream acceptance and its record, so the kill
    tests recovery, not the one window (an answer lost with its worker) that may charge
    twice; accept-then-drop faults cover that window, counted apart.
    """
    admin = _admin(store_url)
    try:
        while True:
            admin.client_pause(WRITE_PAUSE_MS, all=False)
            if not _any_attempt_open(admin):
                break
            admin.client_unpause()
            time.sleep(0.005)
        yield
    finally:
        with contextlib.suppress(redis.ConnectionError):
            admin.client_unpause()
        admin.close()


class Watcher:
    """Samples every job's record; says when each moved after a moment (a kill, an outage)."""

    def __init__(self, store_url: str, job_ids: list[str]) -> None:
        from worker.store.jobs import JobStore

        self.job_ids = job_ids  # grows while the producer enqueues
        self._client = connect(store_url, socket_timeout=2, socket_connect_timeout=1)
        self._store = JobStore(self._client, ttl_s=86400)
        self.latest: dict[str, JobRecord | None] = {}
        self.stuck: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def sample(self) -> dict[str, JobRecord | None]:
        ids = list(self.job_ids)
        try:
            records = self._store.get_many(ids)
        except redis.RedisError:
            return self.latest  # the store is down for a moment: keep the last picture
        with self._lock:
            self.latest = dict(zip(ids, records, strict=True))
        return self.latest

    def finished(self) -> int:
        return sum(1 for r in self.latest.values() if r is not None and r.finished)

    def signatures(self) -> dict[str, tuple[Any, ...]]:
        """What every unfinished job looks like now (its state and counters)."""
        return {j: _signature(r) for j, r in self.sample().items() if r and not r.finished}

    def time_until_all_moved(
        self, since: float, before: dict[str, tuple[Any, ...]], deadline_s: float
    ) -> float | None:
        """Seconds from ``since`` until every job of ``before`` changed (or finished).

        None when some did not in ``deadline_s``; they are kept in :attr:`stuck`.
        """
        while before and time.monotonic() - since < deadline_s:
            time.sleep(SAMPLE_S / 2)
            now = self.sample()
            before = {j: s for j, s in before.items() if _signature(now.get(j)) == s}
        if before:
            self.stuck.update({job_id: self._internals(job_id) for job_id in before})
            return None
        return time.monotonic() - since

    def _internals(self, job_id: str) -> dict[str, Any]:
        """A stuck job's every field and its place in the schedule, for the report."""
        try:
            raw = self._client.hgetall(keys.job(job_id))
            fields: dict[str, Any] = {decode_text(k): decode_text(v) for k, v in raw.items()}
            fields.pop("_request", None)
            fields["scheduled"] = self._client.zscore(keys.SCHEDULE, job_id)
            fields["redis_now"] = self._client.time()[0]
            return fields
        except redis.RedisError as exc:
            return {"error": str(exc)}


def _signature(record: JobRecord | None) -> tuple[Any, ...]:
    if record is None:
        return ("missing",)
    return (record.state, record.polls, record.submit_attempts, record.finished_at)


def run_scenario(
    scenario: Scenario,
    jobs: int,
    log_dir: Path,
    *,
    workers: int = 3,
    concurrency: int = 4,
    timeout_s: float = 900.0,
) -> Outcome:
    """Run ``jobs`` jobs through a fresh fleet under ``scenario``; returns what it measured."""
    from worker.app import configure

    outcome = Outcome(scenario.name, jobs)
    fleet = Fleet(log_dir, workers, concurrency)
    try:
        fleet.control.configure(**scenario.sandbox)
        configure(
            redis_url=fleet.broker.url, result_backend_url=fleet.store.url, kie_callback_url=None
        )
        prompts = [f"chaos {scenario.name} {i} {uuid.uuid4().hex[:8]}" for i in range(jobs)]
        job_ids: list[str] = []
        started = time.monotonic()
        producer = threading.Thread(
            target=_produce, args=(prompts, job_ids, scenario.stretch_s), daemon=True
        )
        producer.start()
        watcher = Watcher(fleet.store.url, job_ids)
        _conduct(scenario, fleet, watcher, outcome, started)
        outcome.seconds = wait_for_all(producer, watcher, jobs, started, timeout_s)
        _judge(fleet, watcher, prompts, outcome)
    finally:
        configure()
        fleet.close()
    return outcome


def wait_for_all(
    producer: threading.Thread, watcher: Watcher, jobs: int, started: float, timeout_s: float
) -> float:
    """Wait until every job was enqueued and finished (or ``timeout_s`` from ``started``);
    returns the seconds since ``started``."""
    producer.join(timeout_s)
    while watcher.finished() < jobs and time.monotonic() < started + timeout_s:
        time.sleep(SAMPLE_S)
        watcher.sample()
    return time.monotonic() - started


#: The tenants and priorities the jobs of a scenario take in turn.
MIX = (
    ("svc-a", "normal"),
    ("svc-b", "interactive"),
    ("svc-a", "bulk"),
    ("svc-c", "normal"),
    ("svc-b", "normal"),
    ("svc-c", "bulk"),
)


def _produce(prompts: Sequence[str], job_ids: list[str], stretch_s: float) -> None:
    """Enqueue every prompt, spread over ``stretch_s``, as a careful producer would, from
    several tenants in every priority (:data:`MIX`), so the lines' order is under fault too.

    The job store may be down for a moment (it is restarted): the producer then retries
    the same request with the same idempotency key, so a write whose answer was lost does
    not become a second job.
    """
    from producers import enqueue_remix

    started = time.monotonic()
    for index, prompt in enumerate(prompts):
        due = started + stretch_s * index / len(prompts)
        time.sleep(max(0.0, due - time.monotonic()))
        while True:
            try:
                job_ids.append(
                    enqueue_remix(
                        prompt=prompt,
                        image_url=SOURCE_IMAGE,
                        reference_image_urls=[REFERENCE_IMAGE],
                        idempotency_key=f"chaos-{prompt}",
                        tenant=MIX[index % len(MIX)][0],
                        priority=MIX[index % len(MIX)][1],
                    )
                )
                break
            except redis.RedisError:
                time.sleep(0.5)


def _conduct(
    scenario: Scenario, fleet: Fleet, watcher: Watcher, outcome: Outcome, started: float
) -> None:
    """Inject the scenario's process faults at their moments; measure how jobs recover."""
    events = [f"kill-{i + 1}" for i in range(scenario.kills)]
    events += ["store"] if scenario.store_restart else []
    events += ["broker"] if scenario.broker_outage_s else []
    lease = float(WORKER_SETTINGS["KIE_REQUEST_DEADLINE_S"]) + 15
    for event in sorted(events, key=EVENT_TIMES.__getitem__):
        at = started + EVENT_TIMES[event] * scenario.stretch_s
        while time.monotonic() < at:
            time.sleep(SAMPLE_S)
            watcher.sample()
        if event.startswith("kill"):
            killed_at, before = fleet.kill_a_worker(watcher)
            outcome.kills += 1
            outcome.watched_after_kill.append(len(before))
            moved = watcher.time_until_all_moved(killed_at, before, lease * 3)
            outcome.moved_again_after_kill_s.append(-1.0 if moved is None else moved)
        elif event == "store":
            fleet.restart(fleet.store, REDIS_DOWN_S)
            outcome.store_restarts += 1
        else:
            fleet.restart(fleet.broker, scenario.broker_outage_s)
            returned_at, before = time.monotonic(), watcher.signatures()
            outcome.broker_outage_s += scenario.broker_outage_s
            outcome.watched_after_outage.append(len(before))
            moved = watcher.time_until_all_moved(returned_at, before, lease * 3)
            outcome.moved_again_after_outage_s.append(-1.0 if moved is None else moved)


def _judge(fleet: Fleet, watcher: Watcher, prompts: Sequence[str], outcome: Outcome) -> None:
    records = watcher.sample()
    stats = fleet.control.stats()
    accepted = stats["accepted_by_prompt"]
    ambiguous = stats.get("ambiguous_by_prompt", {})
    for index, (prompt, job_id) in enumerate(zip(prompts, watcher.job_ids, strict=True)):
        record = records.get(job_id)
        if record is None:
            outcome.lost += 1
            continue
        outcome.mixed_up += (record.tenant, record.priority) != MIX[index % len(MIX)]
        outcome.states[record.state.value] += 1
        if not record.finished:
            outcome.lost += 1
        charged = int(accepted.get(prompt, 0))
        outcome.unknown_outcomes += record.unknown_outcomes
        outcome.flagged_possibly_twice += int(record.possibly_paid_twice)
        if charged > 1:
            outcome.accepted_twice += 1
            if charged > 1 + int(ambiguous.get(prompt, 0)) or not record.possibly_paid_twice:
                outcome.paid_twice_unflagged += 1
    outcome.ambiguous = int(stats.get("ambiguous", 0))
    outcome.faults = _faults(stats)
    metrics = _admin(fleet.broker.url).hgetall(keys.METRICS)
    outcome.pauses = sum(
        int(value)
        for name, value in metrics.items()
        if decode_text(name).startswith("pauses_total:")
    )
    outcome.leaks = _leaks(fleet)
    outcome.stuck = watcher.stuck


def _faults(stats: dict[str, Any]) -> Counter[str]:
    faults: Counter[str] = Counter()
    for endpoint in ("create", "record"):
        for code, count in stats[f"{endpoint}_by_code"].items():
            if code != "200":
                faults[f"{endpoint} {code}"] += int(count)
    for name in ("resets", "html_errors", "cut_bodies", "dropped", "gateway_timeouts"):
        faults[name] += int(stats.get(name, 0))
    return +faults


def _fragments(secret: str) -> list[bytes]:
    return [secret[i : i + 10].encode() for i in range(0, len(secret) - 9, 3)]


def _leaks(fleet: Fleet) -> list[str]:
    """Every place that holds a fragment of the API key: logs, Redis keys and values."""
    parts = _fragments(fleet.api_key)
    found = [str(p) for p in fleet.logs() if any(part in p.read_bytes() for part in parts)]
    for server in (fleet.broker, fleet.store):
        client = redis.Redis.from_url(server.url)
        for key in client.scan_iter("*", count=1000):
            value = _dump(client, key)
            if any(part in key or part in value for part in parts):
                found.append(f"{server.url} {key!r}")
    return found


def _dump(client: redis.Redis, key: bytes) -> bytes:
    kind = decode_text(client.type(key))
    readers: dict[str, Any] = {
        "string": client.get,
        "hash": client.hgetall,
        "list": lambda k: client.lrange(k, 0, -1),
        "set": client.smembers,
        "zset": lambda k: client.zrange(k, 0, -1),
    }
    reader = readers.get(kind)
    return repr(reader(key)).encode() if reader else b""


# ---------------------------------------------------------------------------- report


def figures(outcomes: dict[str, Outcome]) -> list[tuple[str, str]]:
    """The rows of the report: (what, value)."""
    rows: list[tuple[str, str]] = []
    clean = outcomes.get("clean")
    for name, outcome in outcomes.items():
        rows.append((f"{name}: jobs, states", f"{outcome.jobs}: {_counts(outcome.states)}"))
        rows.append(
            (f"{name}: throughput", f"{outcome.jobs_per_s:.1f} jobs/s ({outcome.seconds:.0f} s)")
        )
        stretched = SCENARIOS[name].stretch_s > 0  # enqueued over time: not a throughput
        if clean is not None and name != "clean" and clean.jobs_per_s and not stretched:
            share = outcome.jobs_per_s / clean.jobs_per_s
            rows.append((f"{name}: throughput vs clean", f"{share:.0%}"))
        rows.append((f"{name}: lost", str(outcome.lost)))
        rows.append(
            (
                f"{name}: paid twice, not flagged",
                f"{outcome.paid_twice_unflagged} (accepted twice by the upstream: "
                f"{outcome.accepted_twice}; records flagged possibly_paid_twice: "
                f"{outcome.flagged_possibly_twice}; unknown outcomes: {outcome.unknown_outcomes})",
            )
        )
        rows.append((f"{name}: ambiguous answers (sandbox)", str(outcome.ambiguous)))
        rows.append((f"{name}: leaks of the API key", str(len(outcome.leaks))))
        rows.append((f"{name}: records of another tenant or priority", str(outcome.mixed_up)))
        rows.append((f"{name}: faults injected", _counts(outcome.faults) or "none"))
        rows.append((f"{name}: fleet pauses", str(outcome.pauses)))
        if outcome.kills:
            moved = _recoveries(outcome.moved_again_after_kill_s, outcome.watched_after_kill)
            rows.append(
                (f"{name}: SIGKILLs; every job moving again after", f"{outcome.kills}; {moved}")
            )
        if outcome.store_restarts:
            rows.append((f"{name}: job store restarts (AOF)", str(outcome.store_restarts)))
        if outcome.broker_outage_s:
            moved = _recoveries(outcome.moved_again_after_outage_s, outcome.watched_after_outage)
            rows.append(
                (
                    f"{name}: broker outage; every job moving again after its return",
                    f"{outcome.broker_outage_s:.0f} s; {moved}",
                )
            )
    return rows


def _recoveries(seconds: list[float], watched: list[int]) -> str:
    return ", ".join(
        f"{s:.0f} s ({n} jobs in flight)" if s >= 0 else f"not all within the limit ({n} jobs)"
        for s, n in zip(seconds, watched, strict=True)
    )


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(counter.items()))


def markdown(rows: list[tuple[str, str]], command: str, seconds: float) -> str:
    lines = [
        LATEST_RUN_HEADING,
        "",
        f"`{command}` on {now_utc():%Y-%m-%d %H:%M} UTC, {seconds / 60:.1f} minutes.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "Machine: " + "; ".join(f"{k} {v}" for k, v in machine_info()), ""]
    return "\n".join(lines)


def write_docs(text: str, path: Path) -> None:
    """Replace the "Latest run" section of ``path`` (to the next second-level heading)."""
    current = path.read_text()
    start = current.find(LATEST_RUN_HEADING)
    if start < 0:
        path.write_text(current.rstrip() + "\n\n" + text)
        return
    end = current.find("\n## ", start + len(LATEST_RUN_HEADING))
    rest = "" if end < 0 else current[end:]
    path.write_text(current[:start] + text + rest)


def main(argv: Sequence[str] | None = None) -> int:
    from bench import failover

    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--only", action="append", choices=[*SCENARIOS, FAILOVER])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--docs", type=Path, default=DEFAULT_DOCS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    outcomes: dict[str, Outcome] = {}
    failed_over: list[failover.FailoverOutcome] = []
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="remixq-chaos-") as tmp:
        for name in args.only or [*SCENARIOS, FAILOVER]:
            log_dir = Path(tmp) / name
            log_dir.mkdir()
            print(f"chaos: {name}, {args.jobs} jobs ...", flush=True)
            if name == FAILOVER:
                failed_over += failover.run_both(args.jobs, log_dir, args.workers, args.concurrency)
                continue
            outcomes[name] = run_scenario(
                SCENARIOS[name],
                args.jobs,
                log_dir,
                workers=args.workers,
                concurrency=args.concurrency,
            )
            print(f"chaos: {name} done in {outcomes[name].seconds:.0f} s", flush=True)
    rows = figures(outcomes) + [row for o in failed_over for row in failover.figures(o)]
    for name, value in rows:
        print(f"{name:<62} {value}")
    command = "python -m bench.chaos " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.write_docs:
        write_docs(markdown(rows, command.strip(), time.monotonic() - started), args.docs)
    failed = [name for name, outcome in outcomes.items() if not outcome.ok]
    failed += [f"{FAILOVER} (wait {o.accept_wait_ms} ms)" for o in failed_over if not o.ok]
    for name in failed:
        print(f"chaos: {name} FAILED: {outcomes[name].leaks or ''}", file=sys.stderr)
    stuck = [(name, o.stuck) for name, o in outcomes.items()]
    stuck += [(FAILOVER, o.stuck) for o in failed_over]
    for name, jobs in stuck:
        for job_id, fields in jobs.items():
            print(f"chaos: {name}: job {job_id} did not move: {fields}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
