"""The tests' Redis: a private ``redis-server`` for each pytest process.

Each pytest process that runs tests (every pytest-xdist worker, or pytest itself without
``-n``) starts its own server on a free loopback port in ``pytest_configure``, keeping
nothing on disk, and stops it at the end; the server is also killed when that process dies.
Each test database is one database of that server, published in the environment under its
variable, where test modules, fixtures and the processes they start find it. A variable
set before pytest starts points its database elsewhere (every xdist worker then shares
it: run such a session with ``-n 0``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from sandbox.launch import RedisServer, start_redis

MAIN = "REMIXQ_TEST_REDIS_URL"
POLICY = "REMIXQ_TEST_POLICY_REDIS_URL"
CLI = "REMIXQ_TEST_CLI_REDIS_URL"
#: The environment variable of each test database, and its number on the private server.
DATABASES: dict[str, int] = {MAIN: 14, POLICY: 12, CLI: 13}
_SERVER = pytest.StashKey[tuple[RedisServer, Path, list[str]]]()


def url(variable: str) -> str:
    """The URL of the test database named by ``variable`` (one of :data:`DATABASES`)."""
    value = os.environ.get(variable)
    if not value:
        raise RuntimeError(f"{variable} is not set: the test Redis starts in pytest_configure")
    return value


def sibling(database_url: str, number: int) -> str:
    """Database ``number`` of the server that ``database_url`` is on."""
    return f"{database_url.rsplit('/', 1)[0]}/{number}"


def _runs_tests(config: pytest.Config) -> bool:
    """False for the pytest-xdist controller, which only hands tests to its workers."""
    return hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None)


def start(config: pytest.Config) -> None:
    """Start this process's server and publish the URL of every database not set already."""
    if not _runs_tests(config) or all(os.environ.get(name) for name in DATABASES):
        return
    directory = Path(tempfile.mkdtemp(prefix="remixq-test-redis-"))
    server = start_redis(log_path=directory / "redis.log")
    published = [name for name in DATABASES if not os.environ.get(name)]
    for name in published:
        os.environ[name] = sibling(server.url, DATABASES[name])
    config.stash[_SERVER] = (server, directory, published)


def stop(config: pytest.Config) -> None:
    """Stop the server (its log goes with it) and take back what was published."""
    started = config.stash.get(_SERVER, None)
    if started is None:
        return
    server, directory, published = started
    server.process.stop()
    shutil.rmtree(directory, ignore_errors=True)
    for name in published:
        os.environ.pop(name, None)
