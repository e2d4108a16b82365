"""The multipart forms of the upstream clients are read by the sandbox, whatever the file
name."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from sandbox.server import SandboxServer
from tests.policy_kit import API_KEY
from tests.relay_kit import png_bytes
from worker.upstreams.kie_upload import KieUploadClient


@pytest.mark.parametrize("name", ["plain.png", 'we"ird\\ na;me é.png', "line\r\nbreak.png"])
def test_the_sandbox_accepts_the_upload_form(upstream: SandboxServer, name: str) -> None:
    client = KieUploadClient(upstream.url, SecretStr(API_KEY), request_deadline=10)
    url = client.upload(png_bytes(), name, "image/png")
    assert url.startswith("http")
