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


# ------------------------------------------------------------------ tenants

TOKEN_A, TOKEN_B = "tok-A-SECRET-0123456789", "tok-B-SECRET-9876543210"


@pytest.mark.usefixtures("no_secrets_in_env")
def test_each_token_names_its_tenant_and_a_bare_one_is_the_default_tenants(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REMIX_API_TOKENS", f"svc-a:{TOKEN_A}, svc.b_2 : {TOKEN_B} ,bare-1,bare-2")
    settings = load_settings()

    assert settings.api_token_tenants() == {
        TOKEN_A: "svc-a",
        TOKEN_B: "svc.b_2",
        "bare-1": "default",
        "bare-2": "default",
    }
    assert settings.api_tokens() == [TOKEN_A, TOKEN_B, "bare-1", "bare-2"]
    assert TOKEN_A in settings.secrets() and TOKEN_B in settings.secrets()


@pytest.mark.usefixtures("no_secrets_in_env")
@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (f"svc-a:{TOKEN_A},svc-b:x-1,svc-a:{TOKEN_B}", "entries 1 and 3 name the same tenant"),
        (f"default:{TOKEN_A},default:{TOKEN_B}", "entries 1 and 2 name the same tenant"),
        (f"svc-a:{TOKEN_A},svc-b:{TOKEN_A}", "entries 1 and 2 hold the same token"),
        (f"{TOKEN_A},{TOKEN_A}", "entries 1 and 2 hold the same token"),
        (f"svc-a:{TOKEN_A},svc-b:", "entry 2 has no token"),
        (f"svc-a:{TOKEN_A}|", "entry 1 has no token"),
        (f"svc-a:{TOKEN_A}|{TOKEN_A}", "entry 1 holds the same token twice"),
        (f":{TOKEN_A}", "entry 1 has nothing before its ':'"),
        (f"svc a:{TOKEN_A}", "entry 1: the tenant before ':' must be"),
        (f"{TOKEN_B[:6]}/x:{TOKEN_A}", "entry 1: the tenant before ':' must be"),
    ],
)
def test_a_malformed_token_list_is_refused_naming_the_entry_not_the_secret(
    monkeypatch: pytest.MonkeyPatch, raw: str, reason: str
) -> None:
    message = refusal(monkeypatch, "REMIX_API_TOKENS", raw)

    assert message.startswith("invalid configuration: REMIX_API_TOKENS: ") and reason in message
    assert TOKEN_A[:8] not in message and TOKEN_B[:6] not in message


@pytest.mark.usefixtures("no_secrets_in_env")
def test_a_tokens_file_naming_a_tenant_twice_is_refused_naming_the_file_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "tokens").write_text(f"svc-a:{TOKEN_A},svc-a:{TOKEN_B}\n")
    monkeypatch.setenv("REMIX_API_TOKENS_FILE", str(tmp_path / "tokens"))
    with pytest.raises(
        ConfigurationError, match=r"REMIX_API_TOKENS_FILE: .* name the same"
    ) as caught:
        load_settings()
    assert TOKEN_A[:8] not in str(caught.value) and TOKEN_B[:8] not in str(caught.value)


@pytest.mark.usefixtures("no_secrets_in_env")
def test_a_tenant_may_hold_two_tokens_while_they_are_rotated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REMIX_API_TOKENS", f"svc-a:{TOKEN_A} | {TOKEN_B},svc-b:tok-c")

    assert load_settings().api_token_tenants() == {
        TOKEN_A: "svc-a",
        TOKEN_B: "svc-a",
        "tok-c": "svc-b",
    }


def test_tenant_weights_are_read_and_an_unnamed_tenant_weighs_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REMIX_TENANT_WEIGHTS", " svc-a=3, svc-b = 0.5 ")
    settings = load_settings()

    assert settings.tenant_weights == {"svc-a": 3.0, "svc-b": 0.5}
    assert settings.tenant_weight("svc-a") == 3.0 and settings.tenant_weight("other") == 1.0


def test_without_weights_every_tenant_weighs_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMIX_TENANT_WEIGHTS", " ")
    settings = load_settings()
    assert settings.tenant_weights == {} and settings.tenant_weight("svc-a") == 1.0


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("svc-a=0", "tenant svc-a: the weight must be a number from 0.01 to 100, not '0'"),
        ("svc-a=3,svc-b=-1", "tenant svc-b: the weight must be a number from 0.01 to 100"),
        ("svc-a=heavy", "tenant svc-a: the weight must be a number from 0.01 to 100"),
        ("svc-a=nan", "the weight must be a number from 0.01 to 100"),
        ("svc-a=inf", "the weight must be a number from 0.01 to 100"),
        ("svc-a=1,svc-a=2", "tenant svc-a is named twice"),
        ("svc a=1", "entry 1: tenant: must be 1 to 64 letters"),
        ("svc-a=1,,svc-b=1", "entry 2 '' is not tenant=weight"),
        ("svc-a", "entry 1 'svc-a' is not tenant=weight"),
    ],
)
def test_a_bad_tenant_weight_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, raw: str, reason: str
) -> None:
    message = refusal(monkeypatch, "REMIX_TENANT_WEIGHTS", raw)
    assert message.startswith("invalid configuration: REMIX_TENANT_WEIGHTS: ") and reason in message


def test_max_waiting_is_unlimited_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().remix_tenant_max_waiting is None
    monkeypatch.setenv("REMIX_TENANT_MAX_WAITING", "500")
    assert load_settings().remix_tenant_max_waiting == 500


@pytest.mark.parametrize("raw", ["0", "-3", "many", "1.5", ""])
def test_a_bad_max_waiting_is_refused(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    assert "REMIX_TENANT_MAX_WAITING" in refusal(monkeypatch, "REMIX_TENANT_MAX_WAITING", raw)
