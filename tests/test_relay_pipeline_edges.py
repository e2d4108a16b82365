"""The relay's pay-twice finding end to end: a real ``celery -A worker.app worker``
subprocess (no KIE_API_KEY), real Redis, a producer's enqueue, and a scripted relay on
127.0.0.1 that answers the first remix request with an API-Gateway-style 504 JSON body."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from producers import wait_for_job
from sandbox.launch import REPO_ROOT, ManagedProcess
from tests.conftest import StartWorkers, unique_prompt
from tests.relay_kit import RELAY_API_KEY, enqueue_relay_job
from tests.test_relay_edges import SUCCESS_IMAGES, Answer, ScriptedRelay
from worker.app import services

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway_relay() -> Iterator[ScriptedRelay]:
    def remix(n: int) -> Answer:
        if n == 1:
            return 504, {"message": "Endpoint request timed out"}
        return 200, SUCCESS_IMAGES

    relay = ScriptedRelay(remix, lambda task_id: (404, {"message": "no such task"}))
    yield relay
    relay.stop()


def test_a_worker_does_not_resend_a_relay_request_after_a_gateway_504(
    gateway_relay: ScriptedRelay, sandbox: ManagedProcess, start_workers: StartWorkers
) -> None:
    start_workers(
        1,
        KIE_API_KEY=None,
        IDEOGRAM_BASE_URL=gateway_relay.url,
        IDEOGRAM_API_KEY=RELAY_API_KEY,
        IDEOGRAM_RATE_LIMIT="1000/1s",
        IDEOGRAM_READ_TIMEOUT_S="10",
        IDEOGRAM_REQUEST_DEADLINE_S="15",
    )
    job_id = enqueue_relay_job(services(), unique_prompt("attack-504"))

    record = wait_for_job(job_id, timeout=60)

    assert gateway_relay.remix_requests == 1, (
        f"the worker sent the relay request {gateway_relay.remix_requests} times after a "
        f"504 gateway timeout; the job ended {record.state.value} "
        f"(unknown_outcomes={record.unknown_outcomes}, "
        f"possibly_paid_twice={record.possibly_paid_twice}): the relay may have charged twice"
    )
    assert record.fail_code == "unknown_outcome"


def test_a_relay_job_of_unknown_outcome_says_how_to_send_it_anew(sandbox: ManagedProcess) -> None:
    """The docs once said ``remixq retry --force`` resends a relay job failed
    ``unknown_outcome``; but every relay job's image is a file, deleted when the job
    finishes. Retry refuses such a job saying to submit it again, and the docs say so."""
    from producers.retry import retry_one
    from worker.policies.outcome import fail_job

    svc = services()
    job_id = enqueue_relay_job(svc, unique_prompt("attack-retry-force"))
    fail_job(svc, job_id, "unknown_outcome", "an earlier request's answer was lost")

    outcome = retry_one(job_id, force=True)

    assert outcome.skipped is not None and "submit it again" in outcome.line()
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    docs = "\n".join(page.read_text() for page in pages)
    assert "retry --force JOB_ID` sends it anew" not in docs
    assert "`remixq retry --force` is the deliberate way" not in docs
