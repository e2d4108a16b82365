"""``REMIX_SPEND_CAP``: what it accepts and what it refuses."""

from __future__ import annotations

import pytest

from worker.settings import ConfigurationError, Settings, load_settings, parse_spend_cap


def test_several_windows_with_days_and_hours() -> None:
    assert parse_spend_cap("500/1d, 60/1h") == [(500, 86400.0), (60, 3600.0)]
    assert parse_spend_cap("5/20s") == [(5, 20.0)]


@pytest.mark.parametrize("blank", [None, "", "  "])
def test_unset_or_blank_is_no_cap(blank: str | None) -> None:
    assert parse_spend_cap(blank) == []
    assert Settings(remix_spend_cap=blank).spend_caps == []


@pytest.mark.parametrize("bad", ["500", "0/1d", "500/1d,", "5/1w", "1/1h,2/60m"])
def test_bad_caps_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_spend_cap(bad)


def test_the_setting_is_checked_at_load() -> None:
    assert load_settings(remix_spend_cap="500/1d,60/1h").spend_caps == [
        (500, 86400.0),
        (60, 3600.0),
    ]
    with pytest.raises(ConfigurationError):
        load_settings(remix_spend_cap="lots")
