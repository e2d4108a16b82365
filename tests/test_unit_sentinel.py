"""Sentinel URLs: how they are checked, what a bad one says, and what Celery and redis-py
are given for each Redis role (no server needed; the failover itself is
tests/test_failover.py and tests/test_sentinel_store.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis.sentinel

from worker import settings as settings_module
from worker.app import celery_config, celery_redis_config
from worker.redis_urls import SentinelOptions, SentinelUrl, parse_sentinel_url, url_passwords
from worker.settings import ConfigurationError, load_settings
from worker.store.connection import connect

PASSWORD = "pw-SECRET-0123456789:@/;x"
QUOTED = "pw-SECRET-0123456789%3A%40%2F%3Bx"
SENTINEL_PASSWORD = "spw-SECRET-9876543210"
GROUP = f"sentinel://:{QUOTED}@10.0.0.1:26379/3;sentinel://10.0.0.2:26380/3;sentinel://[::1]/3"


@pytest.fixture(autouse=True)
def no_redis_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment alone decides (the session's producer settings step aside)."""
    monkeypatch.setattr(settings_module, "_overrides", {})
    for name in ("REDIS_URL", "RESULT_BACKEND_URL", "REDIS_SENTINEL_MASTER"):
        for variable in (name, f"{name}_FILE"):
            monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("REDIS_SENTINEL_PASSWORD", raising=False)
    monkeypatch.delenv("REDIS_SENTINEL_PASSWORD_FILE", raising=False)


def refusal(monkeypatch: pytest.MonkeyPatch, name: str, raw: str) -> str:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message and "SECRET" not in message
    return message


def test_a_group_url_names_every_sentinel_the_database_and_the_primary_password() -> None:
    assert parse_sentinel_url(GROUP) == SentinelUrl(
        (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26379)), db=3, password=PASSWORD
    )


def test_credentials_and_database_may_be_given_on_any_entry_once() -> None:
    url = "sentinel://h1;sentinel://user:pw@h2:26380/2"
    assert parse_sentinel_url(url) == SentinelUrl(
        (("h1", 26379), ("h2", 26380)), db=2, username="user", password="pw"
    )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("sentinel://", "needs at least one sentinel host"),
        ("sentinel://:pw@/0", "needs at least one sentinel host"),
        ("sentinel://h1:26379;", "empty entry"),
        ("sentinel://h1:99999", "port that is not a number from 1 to 65535"),
        ("sentinel://h1:0", "port that is not a number from 1 to 65535"),
        ("sentinel://h1:port", "port that is not a number from 1 to 65535"),
        ("sentinel://h1:26379,h2:26379", "not with a comma"),
        ("sentinel://h1;redis://h2:6379", "separates its sentinels with ';sentinel://'"),
        ("sentinel://h1/zero", "database that is not a number"),
        ("sentinel://h1/1;sentinel://h2/2", "different databases"),
        ("sentinel://:a@h1;sentinel://:b@h2", "different passwords"),
        ("sentinel://h1;sentinel://h1:26379", "same sentinel twice"),
        ("sentinel://h1?master_name=x", "takes no ?query"),
    ],
)
def test_a_bad_sentinel_url_stops_the_process_with_one_line_and_no_password(
    monkeypatch: pytest.MonkeyPatch, url: str, reason: str
) -> None:
    secret_url = url.replace("://", f"://:{QUOTED}@", 1) if "@" not in url else url
    for variable in ("REDIS_URL", "RESULT_BACKEND_URL"):
        message = refusal(monkeypatch, variable, secret_url)
        assert message.startswith(f"invalid configuration: {variable}: ")
        assert reason in message and QUOTED not in message
        monkeypatch.delenv(variable)


@pytest.mark.parametrize("name", ["", "  ", "my master", "name\x1b", "prim/ary"])
def test_a_master_name_that_sentinel_cannot_hold_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    assert "REDIS_SENTINEL_MASTER" in refusal(monkeypatch, "REDIS_SENTINEL_MASTER", name)


def test_plain_and_tls_urls_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "rediss://:pw@redis.example:6380/1")
    settings = load_settings()
    config = celery_redis_config(settings)
    assert config["broker_url"] == config["result_backend"] == "rediss://:pw@redis.example:6380/1"
    assert config["result_backend_transport_options"] == {}
    assert "master_name" not in config["broker_transport_options"]


def test_celery_gets_the_kombu_form_and_the_master_name_for_broker_and_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", GROUP)
    monkeypatch.setenv("REDIS_SENTINEL_MASTER", "queue-primary")
    monkeypatch.setenv("REDIS_SENTINEL_PASSWORD", SENTINEL_PASSWORD)
    config = celery_redis_config(load_settings())

    expected = (
        f"sentinel://:{QUOTED}@10.0.0.1:26379/3;sentinel://10.0.0.2:26380/3;"
        "sentinel://[::1]:26379/3"
    )
    assert config["broker_url"] == config["result_backend"] == expected
    for options in (config["broker_transport_options"], config["result_backend_transport_options"]):
        assert options["master_name"] == "queue-primary"
        assert options["sentinel_kwargs"]["password"] == SENTINEL_PASSWORD
        assert options["sentinel_kwargs"]["socket_timeout"] > 0
    # The broker keeps its own options beside the Sentinel ones.
    assert config["broker_transport_options"]["visibility_timeout"] > 0


def test_celery_reads_the_same_hosts_master_and_password_from_the_translation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What kombu's Sentinel channel and Celery's SentinelBackend make of the translation."""
    from celery import Celery
    from celery.backends.redis import SentinelBackend

    monkeypatch.setenv("REDIS_URL", "sentinel://h2:26380;sentinel://:pw@h1:26379/4")
    monkeypatch.setenv("REDIS_SENTINEL_PASSWORD", SENTINEL_PASSWORD)
    app = Celery("sentinel-check", set_as_current=False)
    app.conf.update(celery_redis_config(load_settings()))
    backend = app.backend
    assert isinstance(backend, SentinelBackend)
    hosts = [(h["host"], h["port"]) for h in backend.connparams["hosts"]]
    assert hosts == [("h2", 26380), ("h1", 26379)]
    assert (backend.connparams["db"], backend.connparams["password"]) == (4, "pw")
    sentinel = backend._get_sentinel_instance(**backend.connparams)
    assert sentinel.sentinel_kwargs["password"] == SENTINEL_PASSWORD
    connection = app.connection_for_write()
    assert connection.transport_cls == "sentinel"
    assert (connection.hostname, connection.password, connection.virtual_host) == ("h2", "pw", "4")
    assert connection.transport_options["master_name"] == "mymaster"
    hosts = [url.split("://")[-1].split("@")[-1] for url in connection.alt]
    assert hosts == ["h2:26380/4", "h1:26379/4"]


def test_the_worker_banner_shows_no_password(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery import Celery

    monkeypatch.setenv("REDIS_URL", GROUP)
    app = Celery("banner-check", set_as_current=False)
    app.conf.update(celery_redis_config(load_settings()))
    shown = app.connection_for_write().as_uri() + app.backend.as_uri()
    assert PASSWORD not in shown and QUOTED not in shown


def test_redis_py_gets_a_client_of_the_primary_through_the_sentinels() -> None:
    client = connect(GROUP, SentinelOptions("queue-primary", SENTINEL_PASSWORD), socket_timeout=3)
    pool = client.connection_pool
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
    assert pool.service_name == "queue-primary"
    kwargs: dict[str, Any] = pool.connection_kwargs
    assert (kwargs["db"], kwargs["password"], kwargs["socket_timeout"]) == (3, PASSWORD, 3)
    manager = pool.sentinel_manager
    addresses = [s.connection_pool.connection_kwargs for s in manager.sentinels]
    assert [(a["host"], a["port"]) for a in addresses] == [
        ("10.0.0.1", 26379),
        ("10.0.0.2", 26380),
        ("::1", 26379),
    ]
    assert {a["password"] for a in addresses} == {SENTINEL_PASSWORD}
    assert {a["socket_timeout"] for a in addresses} == {3}


def test_the_settings_name_the_primary_and_the_sentinel_password_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", GROUP)
    client = connect(load_settings().redis_url)
    assert client.connection_pool.service_name == "mymaster"


def test_a_redis_url_may_come_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "url").write_text(GROUP + "\n")
    (tmp_path / "backend").write_text("redis://:pw@127.0.0.1:6379/2\n")
    monkeypatch.setenv("REDIS_URL_FILE", str(tmp_path / "url"))
    monkeypatch.setenv("RESULT_BACKEND_URL_FILE", str(tmp_path / "backend"))
    settings = load_settings()
    assert (settings.redis_url, settings.backend_url) == (GROUP, "redis://:pw@127.0.0.1:6379/2")


def test_a_redis_url_file_is_checked_like_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "url").write_text(f"sentinel://:{QUOTED}@h1:70000\n")
    message = refusal(monkeypatch, "REDIS_URL_FILE", str(tmp_path / "url"))
    assert "REDIS_URL: " in message and "port" in message and QUOTED not in message


def test_a_redis_url_set_both_ways_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "url").write_text(GROUP)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    assert "REDIS_URL and REDIS_URL_FILE are both set" in refusal(
        monkeypatch, "REDIS_URL_FILE", str(tmp_path / "url")
    )


def test_a_missing_redis_url_file_names_the_variable_not_a_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    message = refusal(monkeypatch, "RESULT_BACKEND_URL_FILE", str(tmp_path / "gone"))
    assert "RESULT_BACKEND_URL_FILE: cannot read" in message


def test_every_redis_password_is_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "sentinel://h1;sentinel://:first@h2")
    monkeypatch.setenv("RESULT_BACKEND_URL", "rediss://:second@h3:6380/0")
    monkeypatch.setenv("REDIS_SENTINEL_PASSWORD", SENTINEL_PASSWORD)
    secrets = load_settings().secrets()
    assert {"first", "second", SENTINEL_PASSWORD} <= set(secrets)
    assert url_passwords("sentinel://h1:99999") == []


def test_the_configuration_is_built_lazily_from_the_sentinel_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.settings import get_settings

    monkeypatch.setenv("REDIS_URL", GROUP)
    get_settings.cache_clear()
    try:
        config = celery_config()
    finally:
        get_settings.cache_clear()
    assert config["broker_transport_options"]["master_name"] == "mymaster"
    assert config["broker_url"].startswith(f"sentinel://:{QUOTED}@10.0.0.1:26379/3;")


def test_a_worker_s_broker_connections_ask_the_sentinels_on_every_reconnection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kombu.transport import redis as kombu_redis

    from worker.store import connection

    monkeypatch.setattr(kombu_redis.SentinelChannel, "connection_class", None)
    connection.use_in_kombu()
    assert kombu_redis.SentinelChannel.connection_class is connection._PrimaryConnection
    primary = connect(GROUP, SentinelOptions())
    assert primary.connection_pool.connection_class is connection._PrimaryConnection


def test_no_password_shows_in_the_parsed_url_or_the_options() -> None:
    shown = repr(parse_sentinel_url(GROUP)) + repr(SentinelOptions("m", SENTINEL_PASSWORD))
    assert PASSWORD not in shown and SENTINEL_PASSWORD not in shown
