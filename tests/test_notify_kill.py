"""A worker SIGKILLed in the middle of a webhook delivery: the webhook is sent again.

The receiver holds the first request open; the worker delivering it is killed; once the
delivery's lease ends (``REMIX_NOTIFY_TIMEOUT_S`` + 10 s) another worker sends it again,
with the same delivery id (delivery is at least once).
"""

from __future__ import annotations

import time

import pytest

from producers import enqueue_remix, get_job, wait_for_job
from tests.conftest import REMIX_INPUT, TEST_REDIS_URL, StartWorkers, unique_prompt
from tests.helpers import wait_until
from tests.webhook_receiver import receiver
from worker.models import JobState
from worker.policies.notify import DELIVERY_HEADER
from worker.store.notify import NOTIFY_LEASE_MARGIN_S

pytestmark = pytest.mark.integration

TIMEOUT_S = 2.0
SETTINGS = {
    "REMIX_NOTIFY_ALLOW_PRIVATE": "1",
    "REMIX_NOTIFY_TIMEOUT_S": str(TIMEOUT_S),
    "REMIX_NOTIFY_RETRY_BASE_S": "0.2",
    "REMIX_NOTIFY_RETRY_MAX_S": "1",
}


@pytest.fixture(autouse=True)
def producer_allows_loopback() -> object:
    from worker.app import configure

    configure(
        redis_url=TEST_REDIS_URL, result_backend_url=TEST_REDIS_URL, remix_notify_allow_private=True
    )
    yield
    configure(redis_url=TEST_REDIS_URL, result_backend_url=TEST_REDIS_URL)


def test_a_delivery_cut_by_sigkill_is_sent_again_with_the_same_id(
    start_workers: StartWorkers,
) -> None:
    [victim] = start_workers(1, **SETTINGS)
    with receiver() as hooks:
        # Hangs for longer than the delivery timeout: the worker dies before giving up.
        hooks.plan("/killed", "hang")
        job_id = enqueue_remix(
            unique_prompt("notify-kill"),
            REMIX_INPUT["image_url"],  # type: ignore[arg-type]
            REMIX_INPUT["reference_image_urls"],  # type: ignore[arg-type]
            notify_url=hooks.url("/killed"),
        )
        assert wait_for_job(job_id, timeout=60).state is JobState.SUCCEEDED
        wait_until(lambda: hooks.in_flight == 1, 30)

        victim.kill()
        killed_at = time.monotonic()
        start_workers(1, **SETTINGS)

        def delivered() -> bool:
            record = get_job(job_id)
            return bool(record and record.notification and record.notification.state == "delivered")

        wait_until(delivered, 60)
        took = time.monotonic() - killed_at
        first, second = hooks.deliveries("/killed")

    assert first.headers[DELIVERY_HEADER.lower()] == second.headers[DELIVERY_HEADER.lower()]
    record = get_job(job_id)
    assert record is not None and record.notification is not None
    assert record.notification.attempts == 1  # the killed try never recorded an outcome
    assert took <= TIMEOUT_S + NOTIFY_LEASE_MARGIN_S + 10
