"""A worker's health probe: ``python -m worker.health [--ready]``.

Exits 0 when a worker on this host has a fresh heartbeat in Redis (written by its
dispatcher thread, :mod:`worker.fleet.dispatcher`), 1 when none has; an unreachable Redis
is 0 for liveness and 1 with ``--ready``. Two Redis round trips. What each answer means
for a deployment: docs/operations.md, "Health probes".
"""

from __future__ import annotations

import argparse
import socket
import sys

import redis

from worker import keys
from worker.fleet.dispatcher import LIVE_WORKER_S
from worker.settings import ConfigurationError, get_settings
from worker.store.connection import connect

PROBE_TIMEOUT_S = 3.0


def fresh_heartbeats(client: redis.Redis, host: str, max_age_s: float) -> list[str]:
    """The workers of ``host`` whose heartbeat is at most ``max_age_s`` old (Redis clock)."""
    seconds, micros = client.time()
    now = seconds + micros / 1e6
    members = client.zrangebyscore(keys.WORKERS, now - max_age_s, "+inf")
    names = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
    return [name for name in names if name.rsplit(":", 1)[0] == host]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.health", description=__doc__)
    parser.add_argument("--ready", action="store_true", help="fail when Redis does not answer")
    parser.add_argument("--max-age", type=float, default=LIVE_WORKER_S, metavar="SECONDS")
    parser.add_argument("--host", default=socket.gethostname(), help="default: this host")
    args = parser.parse_args(argv)
    try:
        url = get_settings().redis_url
    except ConfigurationError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    client = connect(url, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S)
    try:
        live = fresh_heartbeats(client, args.host, args.max_age)
    except (redis.RedisError, OSError) as exc:
        verdict = "unhealthy" if args.ready else "alive"
        print(f"{verdict}: Redis does not answer ({type(exc).__name__})", file=sys.stderr)
        return 1 if args.ready else 0
    finally:
        client.close()
    if not live:
        print(f"unhealthy: no heartbeat from {args.host} in {args.max_age:g} s", file=sys.stderr)
        return 1
    print(f"healthy: {', '.join(live)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
