"""Settings: secrets as they come from files, and knobs checked against each other."""

from __future__ import annotations

import pytest

from worker.settings import ConfigurationError, Settings, load_settings

KEY = "sk-settings-0123456789abcdef"


@pytest.mark.parametrize("name", ["KIE_API_KEY", "KIE_WEBHOOK_HMAC_KEY", "IDEOGRAM_API_KEY"])
@pytest.mark.parametrize("raw", [KEY + "\n", KEY + "\r\n", f"  {KEY}\t\n"])
def test_a_secret_read_from_a_file_loses_its_surrounding_whitespace(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str
) -> None:
    monkeypatch.setenv(name, raw)
    secret = getattr(Settings(), name.lower())
    assert secret is not None and secret.get_secret_value() == KEY


@pytest.mark.parametrize("raw", [f"{KEY[:5]}\n{KEY[5:]}", f"{KEY}\x7fx", f"{KEY[:3]}\x1b{KEY[3:]}"])
def test_a_secret_with_a_control_character_inside_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("KIE_API_KEY", raw)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    message = str(caught.value)
    assert "KIE_API_KEY" in message and "control character" in message
    assert KEY[:8] not in message and KEY[-8:] not in message
    assert "\n" not in message


def test_an_empty_secret_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIE_API_KEY", " \n")
    assert Settings().kie_api_key is None


def test_records_must_outlive_every_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMIX_JOB_TTL_S", "3600")
    monkeypatch.setenv("REMIX_SUBMIT_DEADLINE_S", "3600")
    with pytest.raises(ConfigurationError, match="REMIX_JOB_TTL_S"):
        load_settings()


def test_a_request_deadline_longer_than_the_deadline_of_the_job_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KIE_REQUEST_DEADLINE_S", "1000")
    monkeypatch.setenv("REMIX_DEADLINE_S", "600")
    with pytest.raises(ConfigurationError, match="KIE_REQUEST_DEADLINE_S"):
        load_settings()


def test_the_lease_outlives_one_upstream_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIE_REQUEST_DEADLINE_S", "12")
    settings = Settings()
    assert settings.lease_s > settings.kie_request_deadline_s
    assert settings.attempt_settle_s > settings.lease_s
