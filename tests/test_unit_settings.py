"""Settings: secrets as they come from files, and knobs checked against each other."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.settings import ConfigurationError, Settings, load_settings

KEY = "sk-settings-0123456789abcdef"


def refusal(monkeypatch: pytest.MonkeyPatch, name: str, raw: str) -> str:
    """The one-line message with which loading the settings refuses ``name=raw``."""
    monkeypatch.setenv(name, raw)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    return message


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
    message = refusal(monkeypatch, "KIE_API_KEY", raw)
    assert "KIE_API_KEY" in message and "control character" in message
    assert KEY[:8] not in message and KEY[-8:] not in message


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


SECRET_VARIABLES = [
    "KIE_API_KEY",
    "KIE_WEBHOOK_HMAC_KEY",
    "IDEOGRAM_API_KEY",
    "REMIX_API_TOKENS",
    "REMIX_NOTIFY_HMAC_KEY",
    "REDIS_SENTINEL_PASSWORD",
]


@pytest.fixture
def no_secrets_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SECRET_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"{name}_FILE", raising=False)


@pytest.mark.usefixtures("no_secrets_in_env")
@pytest.mark.parametrize("name", SECRET_VARIABLES)
@pytest.mark.parametrize("raw", [KEY + "\n", KEY, KEY + "\r\n"])
def test_every_secret_may_be_read_from_the_file_its_file_variable_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, raw: str
) -> None:
    secret_file = tmp_path / name.lower()
    secret_file.write_bytes(raw.encode())
    monkeypatch.setenv(f"{name}_FILE", str(secret_file))
    secret = getattr(load_settings(), name.lower())
    assert secret is not None and secret.get_secret_value() == KEY


@pytest.mark.usefixtures("no_secrets_in_env")
def test_tokens_from_a_file_are_split_like_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "tokens").write_text("token-a, token-b\n")
    monkeypatch.setenv("REMIX_API_TOKENS_FILE", str(tmp_path / "tokens"))
    settings = load_settings()
    assert settings.api_tokens() == ["token-a", "token-b"]
    assert "token-a" in settings.secrets() and "token-b" in settings.secrets()


@pytest.mark.usefixtures("no_secrets_in_env")
def test_an_unreadable_secret_file_is_one_line_naming_the_variable_and_the_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere" / "kie_api_key"
    monkeypatch.setenv("KIE_API_KEY_FILE", str(missing))
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    message = str(caught.value)
    assert "KIE_API_KEY_FILE" in message and str(missing) in message
    assert "No such file" in message and "\n" not in message


@pytest.mark.usefixtures("no_secrets_in_env")
def test_a_directory_as_secret_file_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KIE_WEBHOOK_HMAC_KEY_FILE", str(tmp_path))
    with pytest.raises(
        ConfigurationError, match="KIE_WEBHOOK_HMAC_KEY_FILE: cannot read"
    ) as caught:
        load_settings()
    assert "\n" not in str(caught.value)


@pytest.mark.usefixtures("no_secrets_in_env")
def test_a_secret_file_that_is_not_text_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "key").write_bytes(KEY.encode() + b"\xff\xfe")
    monkeypatch.setenv("KIE_API_KEY_FILE", str(tmp_path / "key"))
    with pytest.raises(ConfigurationError, match="not UTF-8") as caught:
        load_settings()
    assert KEY[:8] not in str(caught.value)


@pytest.mark.usefixtures("no_secrets_in_env")
@pytest.mark.parametrize("name", SECRET_VARIABLES)
def test_a_secret_set_both_ways_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    (tmp_path / "secret").write_text(KEY + "\n")
    monkeypatch.setenv(name, "other-" + KEY)
    monkeypatch.setenv(f"{name}_FILE", str(tmp_path / "secret"))
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    message = str(caught.value)
    assert f"{name} and {name}_FILE are both set" in message
    assert KEY[:8] not in message and "\n" not in message


@pytest.mark.usefixtures("no_secrets_in_env")
def test_a_secret_file_goes_through_the_same_checks_as_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "key").write_text(f"{KEY[:5]}\n{KEY[5:]}\n")
    monkeypatch.setenv("KIE_API_KEY_FILE", str(tmp_path / "key"))
    with pytest.raises(ConfigurationError, match="control character") as caught:
        load_settings()
    assert KEY[:8] not in str(caught.value)


@pytest.mark.usefixtures("no_secrets_in_env")
@pytest.mark.parametrize("name", SECRET_VARIABLES)
@pytest.mark.parametrize("raw", ["", " ", " \n", "\t\r\n"])
def test_a_secret_set_but_empty_is_refused_not_read_as_unset(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str
) -> None:
    """``KIE_WEBHOOK_HMAC_KEY=""`` must not turn the callback check off, nor
    ``REMIX_API_TOKENS=""`` the API's auth: a secret that is set must hold something."""
    message = refusal(monkeypatch, name, raw)
    assert f"{name}: " in message and "empty" in message


@pytest.mark.usefixtures("no_secrets_in_env")
@pytest.mark.parametrize("name", SECRET_VARIABLES)
def test_an_unset_secret_stays_unset(name: str) -> None:
    assert getattr(load_settings(), name.lower()) is None


@pytest.mark.usefixtures("no_secrets_in_env")
@pytest.mark.parametrize("name", SECRET_VARIABLES)
@pytest.mark.parametrize("raw", ["", "  "])
def test_a_file_variable_set_but_empty_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str
) -> None:
    """``REMIX_API_TOKENS_FILE=${UNSET}`` names no file: that must not open the API."""
    assert f"{name}_FILE is set but empty" in refusal(monkeypatch, f"{name}_FILE", raw)


TOKEN = "tok-SECRET-0123456789abcdef"


@pytest.mark.usefixtures("no_secrets_in_env")
@pytest.mark.parametrize(
    "raw",
    [",", " , ", ",,\n", f"{TOKEN},,tok-b", f"{TOKEN},", f",{TOKEN}", f"{TOKEN}, ,tok-b"],
)
def test_a_token_list_with_an_empty_entry_is_refused_without_showing_a_token(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    """An empty list would turn the API's auth off; an empty entry is a malformed list."""
    message = refusal(monkeypatch, "REMIX_API_TOKENS", raw)
    assert message.startswith("invalid configuration: REMIX_API_TOKENS: ")
    assert TOKEN[:8] not in message and "tok-b" not in message


@pytest.mark.usefixtures("no_secrets_in_env")
@pytest.mark.parametrize("content", [",", " , \n", f"{TOKEN},,tok-b\n"])
def test_a_tokens_file_with_an_empty_entry_is_refused_naming_the_file_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str
) -> None:
    (tmp_path / "tokens").write_text(content)
    monkeypatch.setenv("REMIX_API_TOKENS_FILE", str(tmp_path / "tokens"))
    with pytest.raises(ConfigurationError, match="REMIX_API_TOKENS_FILE: ") as caught:
        load_settings()
    assert TOKEN[:8] not in str(caught.value) and "tok-b" not in str(caught.value)


@pytest.mark.usefixtures("no_secrets_in_env")
def test_tokens_are_split_on_commas_and_trimmed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMIX_API_TOKENS", f" {TOKEN} ,tok-b\n")
    assert load_settings().api_tokens() == [TOKEN, "tok-b"]


@pytest.mark.usefixtures("no_secrets_in_env")
@pytest.mark.parametrize("name", SECRET_VARIABLES)
@pytest.mark.parametrize("content", ["", " \n", "  \r\n"])
def test_an_empty_secret_file_is_refused_not_read_as_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, content: str
) -> None:
    """An empty tokens file must not open the API; an empty HMAC key file must not turn
    signing off."""
    (tmp_path / "secret").write_text(content)
    monkeypatch.setenv(f"{name}_FILE", str(tmp_path / "secret"))
    with pytest.raises(ConfigurationError, match=f"{name}_FILE: .* is empty"):
        load_settings()


@pytest.mark.usefixtures("no_secrets_in_env")
def test_a_byte_order_mark_in_a_secret_file_is_not_part_of_the_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "key").write_bytes(b"\xef\xbb\xbf" + KEY.encode() + b"\n")
    monkeypatch.setenv("KIE_API_KEY_FILE", str(tmp_path / "key"))
    key = load_settings().kie_api_key
    assert key is not None and key.get_secret_value() == KEY


@pytest.mark.usefixtures("no_secrets_in_env")
@pytest.mark.parametrize("name", ["KIE_API_KEY", "IDEOGRAM_API_KEY"])
def test_an_api_key_outside_ascii_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, "\u201c" + KEY + "\u201d")
    with pytest.raises(ConfigurationError, match="outside ASCII") as caught:
        load_settings()
    assert KEY[:8] not in str(caught.value)
