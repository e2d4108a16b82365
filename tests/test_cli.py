"""The ``remixq`` command's input handling, run as a subprocess against Redis with no worker.

Every bad input must exit 2 with exactly one line on stderr and enqueue nothing; a
good one enqueues exactly one ``remix.submit`` message. The commands use their own
Redis database (``REMIXQ_TEST_CLI_REDIS_URL``, see :mod:`tests.redis_kit`), emptied
around each test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producers.cli import BadInput, parse_assignment, parse_assignments, parse_batch
from sandbox.images import render_png
from sandbox.launch import free_port
from tests import redis_kit
from tests.helpers import empty_database, waiting_jobs

pytestmark = pytest.mark.integration  # every command runs as a process
CLI_REDIS_URL = redis_kit.url(redis_kit.CLI)
REMIXQ = Path(sys.executable).with_name("remixq")
CLI_TIMEOUT_S = 60
JOB_KEYS = "remixq:job:*"
IMAGE = "https://example.test/base.png"
REFERENCE = "https://example.test/ref.png"
REQUIRED = ["--prompt", "a knight", "--image-url", IMAGE, "--reference-image-url", REFERENCE]
GOOD_LINE = {"prompt": "a knight", "image_url": IMAGE, "reference_image_urls": [REFERENCE]}


@pytest.fixture
def cli_redis() -> Iterator[redis.Redis]:
    """The commands' Redis database, empty at the start and the end of the test."""
    with empty_database(CLI_REDIS_URL, "the CLI tests") as client:
        yield client


def remixq(*args: str, redis_url: str = CLI_REDIS_URL) -> subprocess.CompletedProcess[str]:
    """Run ``remixq ARGS`` with its broker and result backend at ``redis_url``.

    :param args: the command line after ``remixq``.
    :param redis_url: REDIS_URL and RESULT_BACKEND_URL of the command.
    """
    env = {**os.environ, "REDIS_URL": redis_url, "RESULT_BACKEND_URL": redis_url}
    env.pop("KIE_API_KEY", None)
    return subprocess.run(
        [str(REMIXQ), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def enqueued(client: redis.Redis) -> tuple[int, set[bytes]]:
    """What producers have written: how many jobs wait in line and the job keys."""
    return len(waiting_jobs(client)), set(client.scan_iter(match=JOB_KEYS))


def assert_refused(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    """Exit 2, nothing on stdout, one ``error: ...`` line on stderr holding ``expected``."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0]


def write_batch(path: Path, *lines: dict[str, Any] | str) -> Path:
    """Write a batch file: dicts as JSON objects, strings as they are."""
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    )
    return path


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--prompt", "x", "--image-url", "ftp://example.test/a.png"],
            ["image_url: must be an http(s) URL"],
        ),
        (["--prompt", "x", "--image-url", "not a url"], ["image_url: must be an http(s) URL"]),
        (["--prompt", "", "--image-url", IMAGE], ["prompt:"]),
        (
            ["--prompt", "x", "--image-url", IMAGE, "--set", "strength=0.55"],
            ["invalid request: strength: must be a multiple of 0.1"],
        ),
        (["--prompt", "x", "--image-url", IMAGE, "--set", "strength=2"], ["strength:"]),
        (
            ["--prompt", "x", "--image-url", IMAGE, "--set", "colour=red"],
            ["colour: is not a known input field"],
        ),
        (["--prompt", "x", "--image-url", IMAGE, "--set", "num_images=7"], ["num_images:"]),
        (["--prompt", "x", "--image-url", IMAGE, "--set", "seed=abc"], ["seed:"]),
        (["--prompt", "x", "--image-url", IMAGE, "--set", "expand_prompt=yes"], ["expand_prompt"]),
        (["--prompt", "x", "--image-url", IMAGE, "--set", "strength"], ["KEY=VALUE"]),
        (["--prompt", "x", "--image-url", IMAGE, "--set", "=0.5"], ["KEY=VALUE"]),
        (["--prompt", "x", "--image-url", IMAGE, "--set", "prompt=y"], ["use --prompt"]),
        (
            ["--prompt", "x", "--image-url", IMAGE, "--set", "seed=1", "--set", "seed=2"],
            ["more than once"],
        ),
        (["--prompt", "x", "--image-url", IMAGE, "--idempotency-key", ""], ["idempotency_key"]),
    ],
)
def test_bad_submit_exits_2_with_one_line_and_enqueues_nothing(
    cli_redis: redis.Redis, args: list[str], expected: list[str]
) -> None:
    before = enqueued(cli_redis)
    result = remixq("submit", *args, "--reference-image-url", REFERENCE)
    assert_refused(result, *expected)
    assert "Traceback" not in result.stderr
    assert enqueued(cli_redis) == before == (0, set())


def test_missing_option_is_one_line_too(cli_redis: redis.Redis) -> None:
    result = remixq("submit", "--prompt", "x", "--image-url", IMAGE)
    assert_refused(result, "--reference-image-url")
    assert enqueued(cli_redis) == (0, set())


def test_valid_submit_enqueues_exactly_one_message(cli_redis: redis.Redis) -> None:
    result = remixq(
        "submit",
        *REQUIRED,
        "--set",
        "strength=0.5",
        "--set",
        "num_images=2",
        "--set",
        "expand_prompt=false",
        "--set",
        f'image_urls=["{IMAGE}"]',
        "--set",
        "negative_prompt=blurry, dark",
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert len(job_id) == 32 and result.stdout == job_id + "\n"
    assert enqueued(cli_redis) == (1, {f"remixq:job:{job_id}".encode()})
    assert cli_redis.llen("submit") == 0  # no message before a send moment picks the job
    [waiting] = waiting_jobs(cli_redis)
    assert waiting["job_id"] == job_id
    assert waiting["request"] == {
        "prompt": "a knight",
        "image_url": IMAGE,
        "reference_image_urls": [REFERENCE],
        "strength": 0.5,
        "num_images": "2",
        "expand_prompt": False,
        "image_urls": [IMAGE],
        "negative_prompt": "blurry, dark",
    }
    status = remixq("status", job_id)
    assert status.returncode == 0, status.stderr
    record = json.loads(status.stdout)
    assert record["job_id"] == job_id and record["state"] == "queued"
    assert record["submit_attempts"] == 0 and record["upstream_task_id"] is None


def test_submit_json_prints_the_queued_record(cli_redis: redis.Redis) -> None:
    result = remixq("submit", *REQUIRED, "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["state"] == "queued" and record["result_urls"] == []
    assert waiting_jobs(cli_redis)[0]["job_id"] == record["job_id"]


def test_same_idempotency_key_gives_the_same_job_waiting_once(cli_redis: redis.Redis) -> None:
    first = remixq("submit", *REQUIRED, "--idempotency-key", "order-17")
    second = remixq("submit", *REQUIRED, "--idempotency-key", "order-17")
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout
    assert [job["job_id"] for job in waiting_jobs(cli_redis)] == [first.stdout.strip()]


def test_wait_without_workers_times_out_with_exit_1(cli_redis: redis.Redis) -> None:
    result = remixq("submit", *REQUIRED, "--wait", "--timeout", "0.5")
    assert result.returncode == 1
    job_id = result.stdout.strip()
    assert result.stderr.splitlines() == [f"error: job {job_id} still queued after 0.5s"]


def test_batch_with_one_bad_line_enqueues_nothing(cli_redis: redis.Redis, tmp_path: Path) -> None:
    remixq("submit", *REQUIRED)
    before = enqueued(cli_redis)
    batch = write_batch(
        tmp_path / "jobs.jsonl",
        GOOD_LINE,
        {**GOOD_LINE, "strength": 0.55},
        {**GOOD_LINE, "idempotency_key": "k-1"},
    )
    result = remixq("submit-batch", str(batch))
    assert_refused(result, "line 2: invalid request: strength: must be a multiple of 0.1")
    assert enqueued(cli_redis) == before
    assert before[0] == 1


def test_batch_reports_every_bad_line(cli_redis: redis.Redis, tmp_path: Path) -> None:
    batch = write_batch(
        tmp_path / "jobs.jsonl",
        GOOD_LINE,
        "",
        "[1, 2]",
        '{"prompt": "unterminated"',
        {**GOOD_LINE, "colour": "red"},
        {"prompt": "no images"},
        {**GOOD_LINE, "idempotency_key": ""},
    )
    result = remixq("submit-batch", str(batch), "--wait")
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert [line.split(":", 2)[1].strip() for line in lines] == [
        "line 3",
        "line 4",
        "line 5",
        "line 6",
        "line 7",
    ]
    assert all(line.startswith("error: line ") for line in lines)
    assert "colour: is not a known input field" in lines[2]
    assert "give exactly one of image_url and image_file" in lines[3]
    assert enqueued(cli_redis) == (0, set())


def test_good_batch_puts_each_job_in_line_once(cli_redis: redis.Redis, tmp_path: Path) -> None:
    batch = write_batch(
        tmp_path / "jobs.jsonl",
        {**GOOD_LINE, "idempotency_key": "dup"},
        {**GOOD_LINE, "prompt": "a wizard", "num_images": 3},
        {**GOOD_LINE, "idempotency_key": "dup"},
    )
    result = remixq("submit-batch", str(batch))
    assert result.returncode == 0, result.stderr
    job_ids = result.stdout.split()
    assert len(job_ids) == 3 and job_ids[0] == job_ids[2] != job_ids[1]
    waiting = waiting_jobs(cli_redis)
    assert sorted(job["job_id"] for job in waiting) == sorted(set(job_ids))
    assert {job["request"]["prompt"] for job in waiting} == {"a knight", "a wizard"}


def test_batch_json_prints_one_record_per_line(cli_redis: redis.Redis, tmp_path: Path) -> None:
    batch = write_batch(tmp_path / "jobs.jsonl", GOOD_LINE, GOOD_LINE)
    result = remixq("submit-batch", str(batch), "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["state"] for r in records] == ["queued", "queued"]
    assert len(waiting_jobs(cli_redis)) == 2


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"prompt": "caf\xe9"}\n', "line 1: not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000 + b"\n", "line 1: nested too deeply"),
        (b'{"a":' * 5_000 + b"1" + b"}" * 5_000 + b"\n", "line 1: nested too deeply"),
    ],
)
def test_batch_with_undecodable_or_deeply_nested_line_is_one_line_exit_2(
    cli_redis: redis.Redis, tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(json.dumps(GOOD_LINE).encode() + b"\n" + content)
    expected = expected.replace("line 1", "line 2")
    result = remixq("submit-batch", str(path))
    assert_refused(result, expected)
    assert "Traceback" not in result.stderr
    assert enqueued(cli_redis) == (0, set())


def test_empty_batch_is_bad_input(cli_redis: redis.Redis, tmp_path: Path) -> None:
    result = remixq("submit-batch", str(write_batch(tmp_path / "empty.jsonl", "")))
    assert_refused(result, "holds no requests")


def test_missing_batch_file_is_bad_input(cli_redis: redis.Redis, tmp_path: Path) -> None:
    assert_refused(remixq("submit-batch", str(tmp_path / "nope.jsonl")), "nope.jsonl")


def test_status_of_unknown_job_exits_2(cli_redis: redis.Redis) -> None:
    assert_refused(remixq("status", "0" * 32), "no job")


def test_status_without_id_summarises_jobs_and_queues(cli_redis: redis.Redis) -> None:
    remixq("submit", *REQUIRED)
    remixq("submit", *REQUIRED)
    result = remixq("status")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["jobs_by_state"] == {"queued": 2}
    assert summary["queues"] == {"submit": 0, "poll": 0, "notify": 0, "archive": 0}
    assert [(line["priority"], line["tenant"], line["waiting"]) for line in summary["lines"]] == [
        ("normal", "default", 2)
    ]
    assert summary["webhooks_pending"] == 0 and summary["archives_pending"] == 0
    assert summary["held_by_workers"] == 0 and summary["in_flight_upstream"] == 0


def test_cancel_a_queued_job_then_exit_codes_for_the_rest(cli_redis: redis.Redis) -> None:
    job_id = remixq("submit", *REQUIRED).stdout.strip()

    done = remixq("cancel", job_id)
    assert (done.returncode, done.stdout.strip()) == (0, f"cancelled {job_id}")
    record = json.loads(remixq("status", job_id).stdout)
    assert record["state"] == "cancelled" and record["fail_code"] == "cancelled"
    assert remixq("cancel", job_id).returncode == 0  # cancelling again changes nothing

    assert_refused(remixq("cancel", "0" * 32), "no job")

    accepted = remixq("submit", *REQUIRED).stdout.strip()
    cli_redis.hset(f"remixq:job:{accepted}", "upstream_task_id", json.dumps("task-1"))
    refused = remixq("cancel", accepted)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.strip().count("\n") == 0 and "accepted upstream" in refused.stderr


def test_submit_refuses_a_private_notify_url(cli_redis: redis.Redis) -> None:
    result = remixq("submit", *REQUIRED, "--notify-url", "http://10.0.0.5/hook")
    assert_refused(result, "notify_url", "private")
    assert enqueued(cli_redis) == (0, set())


def test_pause_and_resume_switch_the_known_key(cli_redis: redis.Redis) -> None:
    cli_redis.hset("remixq:keys", "k1", "20/10s")
    assert remixq("resume").stdout.strip() == "nothing was paused"

    paused = remixq("pause", "--message", "deploy")
    assert paused.returncode == 0, paused.stderr
    keys = json.loads(remixq("status").stdout)["keys"]
    assert keys[0]["paused"]["reason"] == "operator"
    assert keys[0]["paused"]["message"] == "deploy"

    assert "k1" in remixq("resume").stdout
    assert json.loads(remixq("status").stdout)["keys"][0]["paused"] is None


def test_pause_without_any_known_key_is_refused(cli_redis: redis.Redis) -> None:
    result = remixq("pause")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "no API key" in result.stderr


def test_unreachable_redis_is_one_line_and_exit_1() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    result = remixq("submit", *REQUIRED, redis_url=dead)
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: cannot reach Redis")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("strength=0.5", ("strength", 0.5)),
        ("expand_prompt=false", ("expand_prompt", False)),
        ("seed=42", ("seed", 42)),
        ('image_urls=["https://a.test/x.png"]', ("image_urls", ["https://a.test/x.png"])),
        ("negative_prompt=blurry", ("negative_prompt", "blurry")),
        ('negative_prompt="42"', ("negative_prompt", "42")),
        ("style=", ("style", "")),
        ("negative_prompt=a=b", ("negative_prompt", "a=b")),
    ],
)
def test_set_values_are_json_when_they_parse(text: str, expected: tuple[str, Any]) -> None:
    assert parse_assignment(text) == expected


def test_set_rejects_malformed_and_reserved_keys() -> None:
    for bad in (["novalue"], ["=1"], ["image_url=https://a.test/x.png"], ["seed=1", "seed=2"]):
        with pytest.raises(BadInput):
            parse_assignments(bad)


def test_parse_batch_skips_blank_lines_and_keeps_line_numbers() -> None:
    items = parse_batch(["\n", json.dumps({**GOOD_LINE, "idempotency_key": "k"}) + "\n"])
    assert [(item.line, item.idempotency_key) for item in items] == [(2, "k")]
    assert items[0].fields == GOOD_LINE


@pytest.mark.parametrize(
    "url", ["notaurl", "redis://127.0.0.1:99999/0", "redis://127.0.0.1:6379/abc", "http://x/0"]
)
def test_a_malformed_redis_url_is_one_line_exit_2(url: str) -> None:
    result = remixq("status", redis_url=url)
    assert_refused(result, "REDIS_URL")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_a_timeout_that_is_not_a_positive_number_is_refused(
    cli_redis: redis.Redis, value: str, tmp_path: Path
) -> None:
    assert_refused(remixq("submit", *REQUIRED, "--wait", "--timeout", value), "--timeout")
    batch = write_batch(tmp_path / "jobs.jsonl", GOOD_LINE)
    assert_refused(remixq("submit-batch", str(batch), "--wait", "--timeout", value), "--timeout")
    assert enqueued(cli_redis) == (0, set())


def test_the_demo_never_prints_a_redis_password() -> None:
    from sandbox.demo import shown_url

    shown = shown_url("redis://:Pw%2F9x%3AQ@127.0.0.1:6379/0")
    assert "Pw" not in shown and "9x" not in shown
    assert shown == "redis://:***@127.0.0.1:6379/0"
    assert shown_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_submit_with_image_files_enqueues_references_not_bytes(
    cli_redis: redis.Redis, tmp_path: Path
) -> None:
    image = render_png("cli-file", 0, "cli file", "square")
    (tmp_path / "base.png").write_bytes(image)
    (tmp_path / "ref.txt").write_bytes(image)  # a PNG by content, whatever its name

    result = remixq(
        "submit",
        "--prompt",
        "x",
        "--image-file",
        str(tmp_path / "base.png"),
        "--reference-image-file",
        str(tmp_path / "ref.txt"),
    )

    assert result.returncode == 0, result.stderr
    [waiting] = waiting_jobs(cli_redis)
    request = waiting["request"]
    assert request["image_file"]["name"] == "base.png"
    assert [r["name"] for r in request["reference_image_files"]] == ["ref.png"]
    assert "image_url" not in request and "reference_image_urls" not in request
    blob = cli_redis.get(f"remixq:blob:{request['image_file']['blob']}")
    assert blob == image


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--image-file", "{missing}"], ["image_file: no such file"]),
        (["--image-file", "{text}"], ["image_file: not a whole JPEG, PNG or WebP image"]),
        (["--image-file", "{dir}"], ["image_file", "not a regular file"]),
        (["--image-url", IMAGE, "--image-file", "{text}"], ["exactly one of --image-url"]),
    ],
)
def test_a_bad_image_file_exits_2_with_one_line_and_writes_nothing(
    cli_redis: redis.Redis, tmp_path: Path, args: list[str], expected: list[str]
) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    where = {"missing": tmp_path / "nope.png", "text": tmp_path / "notes.png", "dir": tmp_path}
    filled = [arg.format(**where) for arg in args]

    result = remixq("submit", "--prompt", "x", *filled, "--reference-image-url", REFERENCE)

    assert_refused(result, *expected)
    assert enqueued(cli_redis) == (0, set()) and not list(cli_redis.scan_iter("remixq:blob:*"))
