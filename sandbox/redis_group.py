"""A Redis group that fails over: a primary, its replicas and Sentinel processes, all real
``redis-server`` processes on 127.0.0.1 (for the failover test and the chaos suite).

Every process is started by :mod:`sandbox.launch`, so it dies with the process that
started it. Timings are short (a primary is down after ``down_after_ms``) so that a
failover takes seconds. See docs/reliability.md, "The chaos suite".
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sandbox.launch import LOOPBACK, RedisServer, free_port, start_redis, start_sentinel

MASTER_NAME = "mymaster"
POLL_S = 0.05


@dataclass
class RedisGroup:
    """A primary with replicas, watched by sentinels; :meth:`close` stops them all.

    :param directory: where the servers' logs and the sentinels' files go.
    :param password: the servers' ``requirepass`` (None: no password).
    :param sentinel_password: the sentinels' own ``requirepass`` (None: no password).
    """

    directory: Path
    replicas: int = 1
    sentinels: int = 3
    password: str | None = None
    sentinel_password: str | None = None
    down_after_ms: int = 1000
    failover_timeout_ms: int = 5000
    master: str = MASTER_NAME
    servers: dict[int, RedisServer] = field(default_factory=dict)
    watchers: dict[int, RedisServer] = field(default_factory=dict)

    def start(self) -> RedisGroup:
        """Start the primary, then its replicas (synchronised), then the sentinels."""
        self.directory.mkdir(parents=True, exist_ok=True)
        primary = self._start_server(free_port())
        port = _port(primary)
        for _ in range(self.replicas):
            replica = self._start_server(free_port(), replica_of=port)
            self.wait_until_replica(_port(replica), port)
        for _ in range(self.sentinels):
            sentinel_port = free_port()
            self.watchers[sentinel_port] = start_sentinel(
                sentinel_port,
                self._sentinel_config(port),
                self.directory / "sentinels",
                password=self.sentinel_password,
            )
        self.wait_until_sentinels_agree(port)
        return self

    def url(self, db: int = 0) -> str:
        """The group's ``sentinel://`` URL (with the servers' password), as REDIS_URL takes it."""
        auth = "" if self.password is None else f":{quote(self.password, safe='')}@"
        entries = [f"sentinel://{LOOPBACK}:{port}/{db}" for port in self.watchers]
        entries[0] = entries[0].replace("://", f"://{auth}", 1)
        return ";".join(entries)

    def client(self, port: int) -> redis.Redis:
        """A client of one server that fails at once instead of retrying."""
        return _direct(port, self.password)

    def primary_port(self) -> int:
        """The primary's port as the first sentinel that answers says."""
        for port in self.watchers:
            found = self._named_primary(port)
            if found is not None:
                return found
        raise RuntimeError("no sentinel answers")

    def kill(self, port: int) -> None:
        """SIGKILL one server (it loses what it had not passed on to a replica)."""
        self.servers[port].process.kill()

    def restart(self, port: int, replica_of: int | None = None) -> None:
        """Start a killed server again on its port, empty: as a replica of ``replica_of``,
        or as it was first started (a primary, until the sentinels convert it)."""
        self._start_server(port, replica_of)

    def wait_for_new_primary(self, old: int, timeout: float) -> int:
        """Wait until every sentinel names a primary other than ``old`` and it takes writes;
        returns its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            named = {self._named_primary(port) for port in self.watchers}
            if len(named) == 1 and (new := named.pop()) not in (old, None):
                with contextlib.suppress(redis.RedisError), self.client(new) as client:
                    if client.info("replication")["role"] == "master":
                        return new
            time.sleep(POLL_S)
        raise TimeoutError(f"the sentinels did not promote a replica within {timeout:g} s")

    def wait_until_replica(self, port: int, primary: int, timeout: float = 30.0) -> None:
        """Wait until the server on ``port`` replicates ``primary`` with its link up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError), self.client(port) as client:
                info = client.info("replication")
                if (
                    info.get("role") == "slave"
                    and int(info.get("master_port", 0)) == primary
                    and info.get("master_link_status") == "up"
                ):
                    return
            time.sleep(POLL_S)
        raise TimeoutError(f"port {port} did not replicate port {primary} within {timeout:g} s")

    def wait_until_sentinels_agree(self, primary: int, timeout: float = 30.0) -> None:
        """Wait until every sentinel knows the primary, its replicas and the other sentinels
        (a failover needs a quorum of sentinels that know each other)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._knows_all(port, primary) for port in self.watchers):
                return
            time.sleep(POLL_S)
        raise TimeoutError(f"the sentinels did not find each other within {timeout:g} s")

    def close(self) -> None:
        for server in [*self.watchers.values(), *self.servers.values()]:
            server.process.kill()

    def _start_server(self, port: int, replica_of: int | None = None) -> RedisServer:
        # A replica keeps the snapshot its primary sends in its directory: one per server.
        data = self.directory / f"data-{port}"
        data.mkdir(exist_ok=True)
        extra = ["--dir", str(data)]
        extra += ["--replicaof", LOOPBACK, str(replica_of)] if replica_of is not None else []
        server = start_redis(
            port,
            log_path=self.directory / f"redis-{port}.log",
            password=self.password,
            extra_args=extra,
        )
        self.servers[port] = server
        return server

    def _sentinel_config(self, primary: int) -> str:
        lines = [
            f"sentinel monitor {self.master} {LOOPBACK} {primary} {self.sentinels // 2 + 1}",
            f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}",
            f"sentinel failover-timeout {self.master} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {self.master} 1",
        ]
        if self.password is not None:
            lines.append(f"sentinel auth-pass {self.master} {self.password}")
        if self.sentinel_password is not None:
            lines.append(f"sentinel sentinel-pass {self.sentinel_password}")
        return "\n".join(lines)

    def _sentinel(self, port: int) -> redis.Redis:
        return _direct(port, self.sentinel_password)

    def _named_primary(self, port: int) -> int | None:
        try:
            with self._sentinel(port) as sentinel:
                found = sentinel.sentinel_get_master_addr_by_name(self.master)
        except redis.RedisError:
            return None
        return None if not found else int(found[1])

    def _knows_all(self, port: int, primary: int) -> bool:
        try:
            with self._sentinel(port) as sentinel:
                state = sentinel.sentinel_master(self.master)
        except redis.RedisError:
            return False
        return (
            int(state["port"]) == primary
            and int(state["num-slaves"]) >= self.replicas
            and int(state["num-other-sentinels"]) >= self.sentinels - 1
        )


def _direct(port: int, password: str | None) -> redis.Redis:
    return redis.Redis(
        LOOPBACK,
        port,
        password=password,
        socket_timeout=2,
        socket_connect_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )


def _port(server: RedisServer) -> int:
    return int(server.url.rsplit(":", 1)[1].split("/")[0])
