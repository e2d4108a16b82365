"""Edges of the operations features found by a hostile review: a cancelled job's spend
reservation, secret files with a byte-order mark, a JobsFailed logged as expected.

Real Redis, the sandbox over HTTP, real worker/Flower processes where needed; no mocks.
"""

from __future__ import annotations

import pytest
import redis

from sandbox.server import SandboxServer
from tests import redis_kit
from tests.policy_kit import accepted, make_services, new_job, submit_now
from worker import keys
from worker.policies import cancelling
from worker.store.jobs import SPEND_FIELD

pytestmark = pytest.mark.integration


def _step(svc, job_id: str) -> str:
    return submit_now(svc, job_id)


def test_a_job_waiting_for_the_rate_budget_holds_no_spend_when_cancelled(
    policy_redis: redis.Redis, upstream: SandboxServer
) -> None:
    """A job waiting for the rate budget must not hold a spend reservation: cancelled
    meanwhile, it never sent anything, and a reservation left in the log would block the
    cap for a whole window. It reserves its spend only once its send moment is used."""
    svc = make_services(upstream.url, remix_spend_cap="2/1h", kie_rate_limit="1/30s")
    (a, _), (b, _) = new_job(svc), new_job(svc)
    assert _step(svc, a) == "accepted"
    assert _step(svc, b) != "accepted"  # waits in line for the rate budget
    assert svc.store.get_internal(b, SPEND_FIELD) is None
    assert cancelling.cancel(svc, b) == "cancelled"

    log = keys.spend_log(svc.api_key_id)
    assert svc.broker.zcard(log) == 1, "the cancelled job holds part of the cap"


def test_a_secret_file_with_a_utf8_bom_is_read_as_the_key(
    policy_redis: redis.Redis, upstream: SandboxServer, tmp_path
) -> None:
    """Windows editors save UTF-8 with a BOM: KIE_API_KEY_FILE keeps U+FEFF in the key,
    the worker starts, and every createTask then breaks (non-ASCII Authorization)."""
    from tests.policy_kit import API_KEY

    secret = tmp_path / "kie_api_key"
    secret.write_bytes(b"\xef\xbb\xbf" + API_KEY.encode() + b"\r\n")
    svc = make_services(
        upstream.url, kie_api_key=None, kie_api_key_file=str(secret), remix_spend_cap="5/1h"
    )
    job_id, prompt = new_job(svc)
    try:
        result = _step(svc, job_id)
    except Exception as exc:  # the task's catch-all fails the job with internal_error
        result = repr(exc)[:80]
    record = svc.store.get(job_id)
    assert (result, record.fail_code, accepted(upstream, prompt)) == ("accepted", None, 1), (
        f"step={result} fail_code={record.fail_code} fail_msg={record.fail_msg!r} "
        f"unknown_outcomes={record.unknown_outcomes} "
        f"spend_log={svc.broker.zcard(keys.spend_log(svc.api_key_id))}"
    )


REDIS_URL = redis_kit.sibling(redis_kit.url(redis_kit.MAIN), 4)


def test_jobs_failed_is_logged_as_an_expected_failure_without_traceback(tmp_path) -> None:
    """JobsFailed is in the tasks' ``throws`` (one line, no traceback), but it cannot be
    re-created from its args, so Celery wraps it in UnpickleableExceptionWrapper, which is
    not in ``throws``: every failed job logs ERROR 'raised unexpected' with a traceback."""
    import time

    from celery import Celery

    from sandbox.launch import start_worker
    from tests.helpers import empty_database

    log = tmp_path / "worker.log"
    with empty_database(REDIS_URL, "review"), SandboxServer() as sb:
        env = {
            "REDIS_URL": REDIS_URL,
            "RESULT_BACKEND_URL": REDIS_URL,
            "KIE_BASE_URL": sb.url,
            "KIE_API_KEY": "sk-sandbox",
        }
        with start_worker(env, concurrency=1, pool="threads", log_path=log):
            app = Celery("review", broker=REDIS_URL, set_as_current=False)
            app.send_task("remix.submit", kwargs={"request": {"prompt": ""}}, queue="submit")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and "JobsFailed" not in log.read_text():
                time.sleep(0.3)
            time.sleep(0.5)
    text = log.read_text()
    assert "JobsFailed" in text
    assert "UnpickleableExceptionWrapper" not in text and "raised unexpected" not in text, [
        line for line in text.splitlines() if "raised" in line
    ]


@pytest.mark.parametrize("content", [b"", b"\n", b"  \r\n"])
def test_an_empty_api_tokens_file_does_not_open_the_api(tmp_path, content: bytes) -> None:
    """REMIX_API_TOKENS_FILE names a file that is empty (a Secret with an empty value, a
    truncated mount): the app starts and serves the jobs API to anyone (fail-open)."""
    import urllib.error
    import urllib.request

    from sandbox.launch import LaunchError, start_api
    from tests.helpers import empty_database

    tokens = tmp_path / "tokens"
    tokens.write_bytes(content)
    env = {
        "REDIS_URL": REDIS_URL,
        "RESULT_BACKEND_URL": REDIS_URL,
        "REMIX_API_TOKENS_FILE": str(tokens),
    }
    with empty_database(REDIS_URL, "review"):
        try:
            api = start_api(env, log_path=tmp_path / "api.log")
        except LaunchError:
            return  # refusing to start is the right answer
        with api:
            try:
                status = urllib.request.urlopen(f"{api.url}/v1/jobs/nope", timeout=5).status
            except urllib.error.HTTPError as exc:
                status = exc.code
    assert status == 401, f"unauthenticated request answered {status}"
