"""``remixq submit --provider``: the relay's jobs through the command, with no worker."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import empty_database, waiting_jobs
from tests.relay_kit import RELAY, png_bytes
from tests.test_cli import (
    CLI_REDIS_URL,
    IMAGE,
    JOB_KEYS,
    assert_refused,
    enqueued,
    remixq,
)
from worker.store.jobs import decode_text

pytestmark = pytest.mark.integration  # every command runs as a process


@pytest.fixture
def cli_redis() -> Iterator[redis.Redis]:
    """The commands' Redis database, empty at the start and the end of the test."""
    with empty_database(CLI_REDIS_URL, "the CLI tests") as client:
        yield client


def test_a_relay_job_is_enqueued_with_its_provider(cli_redis: redis.Redis, tmp_path: Path) -> None:
    image = tmp_path / "src.png"
    image.write_bytes(png_bytes())
    result = remixq(
        "submit",
        "--provider",
        RELAY,
        "--prompt",
        "a knight",
        "--image-file",
        str(image),
        "--set",
        "model=V_1_TURBO",
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    (waiting,) = waiting_jobs(cli_redis)
    assert waiting["provider"] == RELAY and waiting["job_id"] == job_id
    sent = waiting["request"]["image_file"]
    assert sent["sha256"] == hashlib.sha256(png_bytes()).hexdigest()
    assert sent["content_type"] == "image/png" and sent["name"] == "src.png"
    record = {
        decode_text(k): decode_text(v) for k, v in cli_redis.hgetall(f"remixq:job:{job_id}").items()
    }
    assert json.loads(record["provider"]) == RELAY and json.loads(record["model"]) == "V_1_TURBO"


def test_a_kie_job_carries_no_provider_argument(cli_redis: redis.Redis) -> None:
    result = remixq(
        "submit", "--prompt", "a knight", "--image-url", IMAGE, "--reference-image-url", IMAGE
    )
    assert result.returncode == 0, result.stderr
    (waiting,) = waiting_jobs(cli_redis)
    assert waiting["provider"] == "kie"


def test_a_url_for_the_relay_is_refused_in_one_line(cli_redis: redis.Redis) -> None:
    result = remixq("submit", "--provider", RELAY, "--prompt", "x", "--image-url", IMAGE)
    assert_refused(result, "image_url", "image_file only")
    assert enqueued(cli_redis) == (0, set())
    assert not list(cli_redis.scan_iter(match=JOB_KEYS))


def test_an_unknown_provider_is_refused(cli_redis: redis.Redis) -> None:
    result = remixq("submit", "--provider", "midjourney", "--prompt", "x")
    assert result.returncode == 2 and "--provider" in result.stderr
    assert enqueued(cli_redis) == (0, set())
