"""The served OpenAPI document against the running app, by schemathesis.

Every operation gets generated requests, valid and invalid, sent over real HTTP to
``uvicorn producers.http:app`` (auth on, with a token; real Redis; no workers, so jobs stay
queued and are cancelled at the end). The app must answer no 5xx and nothing the document
does not describe: status codes, content types, headers and bodies.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from sandbox.launch import ManagedProcess, start_api
from tests.conftest import TEST_REDIS_URL
from worker.app import services
from worker.models import JobState

pytestmark = pytest.mark.integration
#: Not checked: that the document says *exactly* which requests are valid. The app is
#: stricter than JSON Schema can say (a blank prompt, strength in steps of 0.1, URL syntax,
#: a private notify_url), so some schema-valid requests get the documented 422; and it
#: accepts `num_images` as an int too (a string in the upstream's enum).
NOT_CHECKED = [positive_data_acceptance, negative_data_rejection]
TOKEN = "schema-test-token"
#: Long polls and batches are bounded so that the run stays short.
MAX_WAIT_S = 0.5
MAX_BATCH = 5
#: Generated requests per operation and mode.
EXAMPLES = 60


@pytest.fixture(scope="module")
def schema_app(redis_client: redis.Redis, log_dir: Path) -> Iterator[ManagedProcess]:
    env = {
        "REDIS_URL": TEST_REDIS_URL,
        "RESULT_BACKEND_URL": TEST_REDIS_URL,
        "REMIX_API_TOKENS": TOKEN,
        "KIE_CALLBACK_URL": "",
    }
    process = start_api(env, log_path=log_dir / "http-schema.log")
    yield process
    process.stop()
    _cancel_leftovers()


def _cancel_leftovers() -> None:
    """Jobs the run enqueued must not be sent by a later module's workers."""
    store = services().store
    for state in (JobState.QUEUED,):
        cursor = None
        while True:
            records, cursor = store.list_by_state(state, 500, cursor)
            for record in records:
                store.cancel(record.job_id)
            if cursor is None:
                break


@pytest.fixture(scope="module")
def api_schema(schema_app: ManagedProcess) -> Any:
    return schemathesis.openapi.from_url(f"{schema_app.url}/openapi.json")


def _bounded(case: Any) -> None:
    if isinstance(case.query, dict) and "wait" in case.query:
        wait = case.query["wait"]
        if isinstance(wait, int | float) and not isinstance(wait, bool) and wait > MAX_WAIT_S:
            case.query["wait"] = MAX_WAIT_S
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("jobs"), list):
        body["jobs"] = body["jobs"][:MAX_BATCH]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_app_keeps_to_its_openapi_document(
    api_schema: Any, schema_app: ManagedProcess, mode: GenerationMode
) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8
    fuzzed = [operation.label for operation in operations if _fuzz(operation, mode, schema_app)]
    assert len(fuzzed) >= 6, fuzzed


def _fuzz(operation: Any, mode: GenerationMode, app: ManagedProcess) -> bool:
    """Send generated requests to one operation; False when none can be generated (an
    operation without parameters has no invalid request)."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def keeps_to_it(case: Any) -> None:
        _bounded(case)
        case.call_and_validate(
            base_url=app.url,
            headers={"Authorization": f"Bearer {TOKEN}"},
            excluded_checks=NOT_CHECKED,
            timeout=30,
        )

    try:
        keeps_to_it()
    except Unsatisfiable:
        if mode is GenerationMode.NEGATIVE:
            return False
        raise
    return True
