"""The HTTP app refuses to start on a token setting that holds no token, or entries that
do not say whose they are (a tenant named twice, a malformed entry).

``uvicorn producers.http:app`` runs as a real process; it must exit non-zero with one line
naming the setting, no traceback, and no token in its output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.launch import LOOPBACK, free_port
from tests.conftest import TEST_REDIS_URL

pytestmark = pytest.mark.integration
TOKEN = "tok-SECRET-startup-0123456789"
OTHER_TOKEN = "tok-SECRET-other-9876543210"
#: The app refuses within its imports' time; an app that starts serves until killed.
EXIT_TIMEOUT_S = 30.0


def run_app(env: dict[str, str], tmp_path: Path) -> tuple[int | None, str]:
    """Start the app; its exit code (None: still serving after the timeout) and output."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("REMIX_API_TOKENS")}
    full_env.update(REDIS_URL=TEST_REDIS_URL, RESULT_BACKEND_URL=TEST_REDIS_URL, **env)
    command = [sys.executable, "-m", "uvicorn", "producers.http:app"]
    command += ["--host", LOOPBACK, "--port", str(free_port())]
    log = tmp_path / "api.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=full_env, stdout=out, stderr=subprocess.STDOUT)
        try:
            code: int | None = process.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            code = None
    return code, log.read_text(errors="replace")


def assert_refused_in_one_line(
    code: int | None, output: str, variable: str, reasons: tuple[str, ...] = ()
) -> None:
    assert code not in (None, 0), f"the app started:\n{output[-2000:]}"
    assert "Traceback" not in output, output
    naming = [line for line in output.splitlines() if f"{variable}:" in line]
    assert len(naming) == 1, output
    assert any(reason in naming[0] for reason in reasons or ("holds no token", "empty entry"))
    assert TOKEN[:10] not in output and OTHER_TOKEN[:10] not in output


@pytest.mark.parametrize("content", [",", " , \n", f"{TOKEN},,\n"])
def test_a_tokens_file_without_a_token_stops_the_app(tmp_path: Path, content: str) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(content)
    code, output = run_app({"REMIX_API_TOKENS_FILE": str(tokens)}, tmp_path)
    assert_refused_in_one_line(code, output, "REMIX_API_TOKENS_FILE")


@pytest.mark.parametrize("raw", [",", " , ", f"{TOKEN},,tok-b"])
def test_a_tokens_variable_without_a_token_stops_the_app(tmp_path: Path, raw: str) -> None:
    code, output = run_app({"REMIX_API_TOKENS": raw}, tmp_path)
    assert_refused_in_one_line(code, output, "REMIX_API_TOKENS")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (
            f"svc-a:{TOKEN},svc-b:x-{OTHER_TOKEN},svc-a:{OTHER_TOKEN}\n",
            "entries 1 and 3 name the same tenant",
        ),
        (f"svc-a:{TOKEN},svc-b:\n", "entry 2 has no token"),
        (f"svc a:{TOKEN}\n", "entry 1: the tenant before ':' must be"),
        (f"svc-a:{TOKEN},svc-b:{TOKEN}\n", "entries 1 and 2 hold the same token"),
    ],
)
def test_a_tokens_file_that_mixes_up_tenants_stops_the_app(
    tmp_path: Path, content: str, reason: str
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(content)
    code, output = run_app({"REMIX_API_TOKENS_FILE": str(tokens)}, tmp_path)
    assert_refused_in_one_line(code, output, "REMIX_API_TOKENS_FILE", (reason,))


@pytest.mark.parametrize(
    ("raw", "reason"), [("svc-a=0", "from 0.01 to 100"), ("svc-a=-2", "from 0.01 to 100")]
)
def test_a_weight_of_zero_or_below_stops_the_app(tmp_path: Path, raw: str, reason: str) -> None:
    code, output = run_app({"REMIX_TENANT_WEIGHTS": raw}, tmp_path)
    assert_refused_in_one_line(code, output, "REMIX_TENANT_WEIGHTS", (reason,))
