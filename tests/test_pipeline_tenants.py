"""Tenants and priorities through the pipeline: real Redis, a real worker, the sandbox.

A job's tenant and priority stay on its record to the end, and the job leaves the
waiting counts when it is accepted; ``remix.submit`` over the Celery protocol takes any
tenant name (tenants are not a registry), fails a bad priority or tenant name with
``invalid_request``, and a tenant at the worker's ``REMIX_TENANT_MAX_WAITING`` with
``queue_full``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from producers import cancel_job, enqueue_remix, get_job, wait_for_job
from producers.fleet import pause_submissions, resume_submissions
from sandbox.control import SandboxControl
from tests.conftest import REMIX_INPUT, unique_prompt
from tests.helpers import accepted, create_requests, wait_until
from worker.app import app, services
from worker.models import JobRecord, JobState

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("fleet")]
WORKER_COUNT = 1
MAX_WAITING = 2
WORKER_SETTINGS = {"REMIX_TENANT_MAX_WAITING": str(MAX_WAITING)}
JOB_TIMEOUT_S = 60


def tenant_name(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


def sent_by_celery(*, finished: bool = True, **kwargs: object) -> JobRecord:
    """Send ``remix.submit`` by name, as a producer in another language does; its record
    once the worker wrote it (and, with ``finished``, once the job finished)."""
    job_id = f"celery-{uuid.uuid4().hex}"
    app.send_task("remix.submit", kwargs={"job_id": job_id, **kwargs}, queue="submit")
    record = wait_until(lambda: get_job(job_id), timeout=15)
    return wait_for_job(job_id, timeout=JOB_TIMEOUT_S) if finished else record


@pytest.fixture
def paused() -> Iterator[None]:
    """Submissions held: enqueued jobs stay queued (not yet sent)."""
    wait_until(lambda: pause_submissions("tenant tests"), timeout=15)
    try:
        yield
    finally:
        resume_submissions()


def test_the_record_carries_its_tenant_and_priority_to_the_end(control: SandboxControl) -> None:
    tenant, prompt = tenant_name("svc-e2e"), unique_prompt("tenant-e2e")

    job_id = enqueue_remix(prompt=prompt, tenant=tenant, priority="bulk", **REMIX_INPUT)  # type: ignore[arg-type]
    record = wait_for_job(job_id, timeout=JOB_TIMEOUT_S)

    assert record.state is JobState.SUCCEEDED and accepted(control, prompt) == 1
    assert (record.tenant, record.priority) == (tenant, "bulk")
    assert not [key for key in services().store.waiting_counts() if key[0] == tenant]


def test_the_celery_entry_takes_a_tenant_it_never_saw(control: SandboxControl) -> None:
    tenant, prompt = tenant_name("never-seen"), unique_prompt("tenant-celery")
    request = {"prompt": prompt, **REMIX_INPUT}

    record = sent_by_celery(request=request, tenant=tenant, priority="interactive")

    assert record.state is JobState.SUCCEEDED, record.fail_msg
    assert (record.tenant, record.priority) == (tenant, "interactive")
    assert accepted(control, prompt) == 1


@pytest.mark.parametrize(
    ("options", "named", "kept"),
    [
        ({"priority": "urgent"}, "priority: must be one of interactive, normal, bulk", "svc-x"),
        ({"priority": 3}, "priority: must be one of", "svc-x"),
        ({"tenant": "svc x"}, "tenant: must be 1 to 64 letters", "default"),
        ({"tenant": ["svc-x"]}, "tenant: must be 1 to 64 letters", "default"),
    ],
)
def test_the_celery_entry_fails_a_bad_priority_or_tenant_with_invalid_request(
    control: SandboxControl, options: dict[str, object], named: str, kept: str
) -> None:
    prompt = unique_prompt("tenant-celery-bad")
    record = sent_by_celery(
        request={"prompt": prompt, **REMIX_INPUT}, **{"tenant": "svc-x", **options}
    )

    assert record.state is JobState.FAILED and record.fail_code == "invalid_request"
    assert named in (record.fail_msg or "") and "\n" not in (record.fail_msg or "")
    assert record.tenant == kept
    assert create_requests(control, prompt) == 0


@pytest.mark.usefixtures("paused")
def test_the_celery_entry_fails_a_job_of_a_tenant_at_its_limit_with_queue_full(
    control: SandboxControl,
) -> None:
    tenant, prompt = tenant_name("svc-full"), unique_prompt("tenant-full")
    waiting = [
        enqueue_remix(prompt=unique_prompt("tenant-wait"), tenant=tenant, **REMIX_INPUT)  # type: ignore[arg-type]
        for _ in range(MAX_WAITING)
    ]
    request = {"prompt": prompt, **REMIX_INPUT}
    try:
        record = sent_by_celery(request=request, tenant=tenant)
        other = sent_by_celery(request=request, tenant=tenant_name("svc-other"), finished=False)
    finally:
        for job_id in waiting:
            cancel_job(job_id)

    assert record.state is JobState.FAILED and record.fail_code == "queue_full"
    assert "REMIX_TENANT_MAX_WAITING" in (record.fail_msg or "") and record.tenant == tenant
    assert "\n" not in (record.fail_msg or "")
    assert other.state is JobState.QUEUED and other.fail_code is None  # not refused
    cancel_job(other.job_id)
    assert create_requests(control, prompt) == 0
