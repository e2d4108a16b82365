"""Redis URLs: a plain server (``redis://``, ``rediss://``, ``unix://``) or a Sentinel group.

A Sentinel URL is written the way Celery's Sentinel transport takes it, one entry per
sentinel: ``sentinel://[[user]:password@]host[:port][/db][;sentinel://host[:port]...]``.
The credentials and the database (given once, on any entry) are the primary's; the
primary's name is ``REDIS_SENTINEL_MASTER`` and the sentinels' own password
``REDIS_SENTINEL_PASSWORD`` (:class:`SentinelOptions`). Errors are one line that never
holds the URL, which may hold a password. See docs/operations.md, "Redis: durability and HA".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import SplitResult, quote, unquote, urlsplit

SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_SENTINEL_MASTER = "mymaster"
_MASTER_NAME = re.compile(r"[A-Za-z0-9._:-]+")


@dataclass(frozen=True)
class SentinelOptions:
    """What a Sentinel URL leaves to the settings: the primary's name, the sentinels' password."""

    master: str = DEFAULT_SENTINEL_MASTER
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed Sentinel URL: where the sentinels listen, and how to use the primary."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def celery_url(self) -> str:
        """The URL for Celery's broker and result backend: the primary's credentials on the
        first entry (where kombu and Celery read them), the database on every one."""
        entries = [f"{SENTINEL_SCHEME}://{_host(h)}:{p}/{self.db}" for h, p in self.sentinels]
        entries[0] = entries[0].replace("://", "://" + self._userinfo(), 1)
        return ";".join(entries)

    def _userinfo(self) -> str:
        if self.username is None and self.password is None:
            return ""
        return f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` names a Sentinel group rather than one server."""
    return url.strip().lower().startswith(f"{SENTINEL_SCHEME}://")


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse a Sentinel URL; raises ``ValueError`` with one line that quotes none of it."""
    entries = [entry.strip() for entry in url.strip().split(";")]
    if not any(entries):
        raise ValueError("a sentinel:// URL needs at least one sentinel host")
    if not all(entries):
        raise ValueError("has an empty entry (two ';' in a row, or one at an end)")
    parsed = [_entry(entry) for entry in entries]
    sentinels = tuple(_address(parts) for parts in parsed)
    if len(set(sentinels)) != len(sentinels):
        raise ValueError("names the same sentinel twice")
    return SentinelUrl(
        sentinels,
        db=int(_agreed("databases", {_database(p) for p in parsed}) or 0),
        username=_agreed("user names", {unquote(p.username) for p in parsed if p.username}),
        password=_agreed("passwords", {unquote(p.password) for p in parsed if p.password}),
    )


def url_passwords(url: str) -> list[str]:
    """Every password a Redis URL holds (for the log redaction); none when it is malformed."""
    try:
        if is_sentinel_url(url):
            password = parse_sentinel_url(url).password
            return [password] if password else []
        password = urlsplit(url).password
    except ValueError:
        return []
    return [unquote(password)] if password else []


def check_master_name(value: str) -> str:
    """``REDIS_SENTINEL_MASTER``: a name as Sentinel's ``monitor`` line gives it."""
    value = value.strip()
    if not value:
        raise ValueError("is set but empty; give the primary's name as Sentinel knows it")
    if not _MASTER_NAME.fullmatch(value):
        raise ValueError("must be a name of letters, digits, '.', '_', ':' or '-'")
    return value


def _entry(entry: str) -> SplitResult:
    parts = urlsplit(entry)
    if parts.scheme.lower() != SENTINEL_SCHEME:
        raise ValueError("separates its sentinels with ';sentinel://' (each entry is a URL)")
    if "," in parts.netloc:
        raise ValueError("separates its sentinels with ';sentinel://', not with a comma")
    if parts.query or parts.fragment:
        raise ValueError("a sentinel:// URL takes no ?query or #fragment")
    if not parts.hostname:
        raise ValueError("a sentinel:// URL needs at least one sentinel host")
    return parts


def _address(parts: SplitResult) -> tuple[str, int]:
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has a sentinel port that is not a number from 1 to 65535") from None
    if port == 0:
        raise ValueError("has a sentinel port that is not a number from 1 to 65535")
    return (parts.hostname or "", port or DEFAULT_SENTINEL_PORT)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _database(parts: SplitResult) -> str | None:
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ValueError("names a database that is not a number")
    return str(int(database)) if database else None


def _agreed(what: str, values: set[str | None]) -> str | None:
    """The one value the entries give (None when none does)."""
    values.discard(None)
    if len(values) > 1:
        raise ValueError(f"gives different {what} on its entries; give them once")
    return next(iter(values), None)
