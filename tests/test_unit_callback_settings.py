"""The callback settings: ``KIE_CALLBACK_URL`` is https outside loopback, and the
``KIE_CALLBACK_CONFIRM`` switch."""

from __future__ import annotations

import pytest

from worker.settings import ConfigurationError, load_settings

HMAC_KEY = "whk-SECRET-callback-settings"


@pytest.fixture(autouse=True)
def signed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIE_WEBHOOK_HMAC_KEY", HMAC_KEY)
    monkeypatch.delenv("KIE_CALLBACK_CONFIRM", raising=False)


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/cb",
        "http://remixq.example.com/v1/callbacks/kie",
        "HTTP://example.com/cb",
        "http://10.0.0.5:8000/v1/callbacks/kie",
        "http://[fe80::1]/cb",
        "http://127.0.0.1.example.com/cb",
        "http://localhost.example.com/cb",
        "http://127.1/cb",
    ],
)
def test_a_plain_http_callback_url_outside_loopback_stops_the_settings_in_one_line(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("KIE_CALLBACK_URL", url)

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    message = str(caught.value)
    assert "KIE_CALLBACK_URL" in message and "https" in message
    assert "\n" not in message and HMAC_KEY not in message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/cb",
        "http://127.0.0.1:8000/v1/callbacks/kie",
        "http://127.5.6.7/cb",
        "http://localhost:8000/v1/callbacks/kie",
        "http://LOCALHOST/cb",
        "http://[::1]:8000/cb",
        "https://remixq.example.com/v1/callbacks/kie",
        "https://10.0.0.5/cb",
        "HTTPS://remixq.example.com/cb",
    ],
)
def test_https_anywhere_and_plain_http_on_loopback_are_accepted(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("KIE_CALLBACK_URL", url)

    settings = load_settings()

    assert settings.kie_callback_url == url and settings.callbacks_enabled


def test_callback_confirmation_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().kie_callback_confirm is False

    monkeypatch.setenv("KIE_CALLBACK_CONFIRM", "1")

    assert load_settings().kie_callback_confirm is True
