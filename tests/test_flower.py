"""Flower shows the fleet's jobs: a real worker, Flower and the sandbox, read through
Flower's HTTP API and in headless Chromium (Debian's, through its chromedriver).

Flower is started before any worker, behind basic auth, without the upstream key; the
worker runs without ``-E`` (as the Procfile starts it), so seeing its tasks proves that
Flower switches task events on. Set ``REMIXQ_WRITE_FLOWER_PNG=1`` to save the tasks
page to ``docs/flower.png``.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from producers import enqueue_remix, wait_for_job
from sandbox.control import SandboxControl
from sandbox.launch import REPO_ROOT, ManagedProcess, start_flower, start_worker
from tests.conftest import REMIX_INPUT, SECRET_API_KEY, unique_prompt, worker_env
from tests.helpers import wait_until
from worker.app import app as worker_app
from worker.store.publisher import POLL_TASK, SUBMIT_TASK

pytestmark = [pytest.mark.integration]
CHROMEDRIVER = "/usr/bin/chromedriver"
FLOWER_USER = "operator"
FLOWER_PASSWORD = f"pw-{uuid.uuid4().hex[:12]}"
JOB_TIMEOUT_S = 60
SEEN_TIMEOUT_S = 30
SCREENSHOT = REPO_ROOT / "docs" / "flower.png"


@pytest.fixture(scope="module")
def flower(sandbox: ManagedProcess, log_dir: Path) -> Iterator[ManagedProcess]:
    env = worker_env(sandbox.url)
    process = start_flower(
        env, basic_auth=f"{FLOWER_USER}:{FLOWER_PASSWORD}", log_path=log_dir / "flower.log"
    )
    try:
        _await_event_capture(process)
        yield process
    finally:
        process.stop()


def _await_event_capture(flower: ManagedProcess) -> None:
    """Wait until Flower records events: it answers HTTP a moment before its event
    receiver takes messages, and an event published in between is lost (seen here). A
    probe ``task-sent`` event (task name ``probe``) is sent until Flower lists it."""
    probe = f"flower-probe-{uuid.uuid4().hex[:8]}"

    def seen() -> bool:
        with worker_app.events.default_dispatcher() as dispatcher:
            dispatcher.send("task-sent", uuid=probe, name="probe")
        time.sleep(0.2)
        return probe in tasks(flower)

    wait_until(seen, timeout=SEEN_TIMEOUT_S, interval=0.3)


def api(flower: ManagedProcess, path: str, **params: Any) -> Any:
    answer = requests.get(
        f"{flower.url}{path}", params=params, auth=(FLOWER_USER, FLOWER_PASSWORD), timeout=10
    )
    answer.raise_for_status()
    assert SECRET_API_KEY not in answer.text
    return answer.json()


def tasks(flower: ManagedProcess, **params: Any) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = api(flower, "/api/tasks", **params)
    return found


def _enqueue(prompt: str) -> str:
    return enqueue_remix(prompt=prompt, **REMIX_INPUT)  # type: ignore[arg-type]


def polls_naming(found: dict[str, dict[str, Any]], job_id: str) -> list[dict[str, Any]]:
    return [t for t in found.values() if t["name"] == POLL_TASK and job_id in str(t["kwargs"])]


@pytest.fixture(scope="module")
def scene(
    flower: ManagedProcess, sandbox: ManagedProcess, log_dir: Path
) -> Iterator[dict[str, str]]:
    """Jobs that went through Flower's view: one queued before any worker, two that
    succeed, one refused with a 422 (failed by its submit) and one whose generation fails
    upstream (failed by a poll)."""
    SandboxControl(sandbox.url).configure(faults={})
    queued = _enqueue(unique_prompt("flower queued before any worker: a cat in a hat"))
    seen = wait_until(lambda: tasks(flower).get(queued), timeout=SEEN_TIMEOUT_S)
    assert seen["state"] == "PENDING" and seen["name"] == SUBMIT_TASK
    worker = start_worker(
        worker_env(sandbox.url), concurrency=2, log_path=log_dir / "flower-worker.log"
    )
    try:
        jobs = {
            "queued": queued,
            "ok": _enqueue(unique_prompt("flower ok: a watercolour lighthouse at dawn")),
            "refused": _enqueue(unique_prompt("[sandbox:create=422] flower refused")),
            "generation": _enqueue(unique_prompt("[sandbox:fail] flower generation fails")),
        }
        for job_id in jobs.values():
            wait_for_job(job_id, timeout=JOB_TIMEOUT_S)
        yield jobs
    finally:
        worker.stop()


def test_flower_api_needs_the_credentials(flower: ManagedProcess) -> None:
    assert requests.get(f"{flower.url}/api/tasks", timeout=10).status_code == 401
    assert requests.get(f"{flower.url}/tasks", timeout=10).status_code == 401


def test_submit_and_poll_show_job_ids_and_prompt(
    flower: ManagedProcess, scene: dict[str, str]
) -> None:
    def with_poll() -> dict[str, dict[str, Any]] | None:
        found = tasks(flower)
        return found if polls_naming(found, scene["ok"]) else None

    found = wait_until(with_poll, timeout=SEEN_TIMEOUT_S)
    submit = found[scene["ok"]]
    assert submit["name"] == SUBMIT_TASK
    assert f"'job_id': '{scene['ok']}'" in submit["kwargs"]
    assert "a watercolour lighthouse at dawn" in submit["kwargs"]
    assert "image_url" not in submit["kwargs"]
    assert scene["ok"] in str(polls_naming(found, scene["ok"])[0]["kwargs"])
    # The queued job's row went on from PENDING once the worker took it.
    assert found[scene["queued"]]["state"] in ("SUCCESS", "STARTED", "RECEIVED")


def test_failed_jobs_are_failures_with_their_fail_code(
    flower: ManagedProcess, scene: dict[str, str]
) -> None:
    def both_failed() -> dict[str, dict[str, Any]] | None:
        failed = tasks(flower, state="FAILURE")
        text = str(failed)
        return failed if scene["refused"] in text and scene["generation"] in text else None

    failed = wait_until(both_failed, timeout=SEEN_TIMEOUT_S)
    refused = failed[scene["refused"]]  # the submit's row: its task id is the job id
    assert refused["name"] == SUBMIT_TASK
    assert f"job {scene['refused']} failed: 422" in refused["exception"]
    by_poll = [t for t in failed.values() if t["name"] == POLL_TASK]
    assert any(f"job {scene['generation']} failed: 501" in t["exception"] for t in by_poll)
    # A poll batch may hold the good job too, but only the failed ones are named as failed.
    assert scene["ok"] not in failed
    assert not any(scene["ok"] in str(t["exception"]) for t in failed.values())


def test_no_secret_in_any_flower_answer(flower: ManagedProcess, scene: dict[str, str]) -> None:
    for task_id in tasks(flower):
        api(flower, f"/api/task/info/{task_id}")  # api() asserts the key is absent
    api(flower, "/api/workers")
    for page in ("/", "/tasks", "/workers", f"/task/{scene['refused']}"):
        answer = requests.get(f"{flower.url}{page}", auth=(FLOWER_USER, FLOWER_PASSWORD))
        assert answer.status_code == 200 and SECRET_API_KEY not in answer.text


def chromium_missing() -> str | None:
    """Why the browser test cannot run here (None: it can)."""
    if shutil.which("chromium") is None:
        return "Debian's chromium is not installed (apt-get install chromium chromium-driver)"
    if not os.access(CHROMEDRIVER, os.X_OK):
        return f"{CHROMEDRIVER} is missing (apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


def test_tasks_page_in_chromium(
    flower: ManagedProcess, scene: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    reason = chromium_missing()
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium must never download a browser
    with headless_chromium() as browser:
        browser.get(f"http://{FLOWER_USER}:{FLOWER_PASSWORD}@{flower.url[7:]}/tasks")
        wait_until(lambda: browser.find_elements("css selector", "#tasks-table tbody tr"), 15)
        # Every row on one page (Flower shows 15), newest first as Flower sorts them.
        browser.execute_script("$('#tasks-table').DataTable().page.len(100).draw();")
        text = wait_until(lambda: _table_with(browser, scene), timeout=SEEN_TIMEOUT_S)
        assert SUBMIT_TASK in text and POLL_TASK in text
        assert SECRET_API_KEY not in browser.page_source
        if os.environ.get("REMIXQ_WRITE_FLOWER_PNG") == "1":
            browser.save_screenshot(str(SCREENSHOT))


def _table_with(browser: Any, scene: dict[str, str]) -> str | None:
    """The tasks table's text once it lists every job of the scene (and a poll)."""
    text: str = browser.find_element("id", "tasks-table").text
    wanted = [*scene.values(), SUBMIT_TASK, POLL_TASK]
    return text if all(item in text for item in wanted) else None


class headless_chromium:
    """Debian's chromium through /usr/bin/chromedriver; selenium never downloads one."""

    def __enter__(self) -> Any:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
            options.add_argument(flag)
        options.add_argument("--window-size=1920,1000")
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        return self.driver

    def __exit__(self, *_: object) -> None:
        self.driver.quit()
