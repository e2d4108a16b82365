"""A real S3-compatible server for the archive tests: moto in server mode on 127.0.0.1.

``moto_server`` runs as a subprocess speaking the S3 protocol over HTTP, so boto3 (in the
test process and in worker subprocesses) talks to it exactly as it would to S3. The
credentials are test values, set in the environment as boto3's chain expects them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import wait_until
from tests.webhook_receiver import free_port

#: A distinctive secret key, so a leak into a record or a log line is found.
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "remixq-test-access-key",
    "AWS_SECRET_ACCESS_KEY": f"remixq-test-SECRET-{uuid.uuid4().hex}",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str

    def client(self) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id=AWS_TEST_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=AWS_TEST_ENV["AWS_DEFAULT_REGION"],
        ).client("s3", endpoint_url=self.endpoint_url)


def _up(url: str) -> bool:
    try:
        requests.get(url, timeout=0.5)
    except requests.RequestException:
        return False
    return True


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server with one bucket; boto3's credentials set in this process."""
    port = free_port()
    log = Path(tmp_path_factory.mktemp("moto")) / "moto.log"
    binary = Path(sys.executable).parent / "moto_server"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    saved = {name: os.environ.get(name) for name in AWS_TEST_ENV}
    os.environ.update(AWS_TEST_ENV)
    try:
        server = S3Server(f"http://127.0.0.1:{port}", f"remixq-archive-{uuid.uuid4().hex[:8]}")
        wait_until(lambda: _up(server.endpoint_url), 20, interval=0.1)
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        process.terminate()
        process.wait(10)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
