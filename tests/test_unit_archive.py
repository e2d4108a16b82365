"""Archiving's pieces without Redis: the download checks, the directory store, the settings.

Downloads go to raw local HTTP servers (``tests.helpers.raw_http_server``) that give the
answers a CDN should not: too big, not an image, too slow, redirected off http(s).
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import raw_http_server, whole_png
from tests.outbound_kit import PUBLIC, Network, Reply, network, recorder, redirect_to
from worker.net.outbound import Guard
from worker.policies.archive import FetchError, fetch_image
from worker.settings import ConfigurationError, Settings, load_settings
from worker.store.archive_files import ArchiveError, DirectoryArchive, S3Archive, archive_store

__all__ = ["network"]  # the fixture, used by name

PNG = whole_png()
JPEG = b"\xff\xd8\xff\xe0" + b"\x01" * 300 + b"\xff\xd9"


def answer_with(
    body: bytes, content_type: str = "image/png", status: str = "200 OK", extra: str = ""
) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
        )
        conn.sendall(head.encode() + body)

    return answer


#: The raw servers are on 127.0.0.1.
LOOPBACK = Guard(allow_private=True)


def fetch(
    url: str, max_bytes: int = 10_000, timeout_s: float = 5.0, guard: Guard = LOOPBACK
) -> bytes:
    return fetch_image(url, max_bytes=max_bytes, timeout_s=timeout_s, guard=guard).data


def test_an_image_is_fetched_with_its_sniffed_type() -> None:
    # The header may say image/*, the bytes decide which image it is.
    with raw_http_server(answer_with(JPEG, "image/png")) as base:
        fetched = fetch_image(base + "/0.png", max_bytes=10_000, timeout_s=5, guard=LOOPBACK)
    assert fetched.data == JPEG
    assert fetched.content_type == "image/jpeg"


def test_an_image_larger_than_the_cap_is_refused_by_its_length() -> None:
    with raw_http_server(answer_with(PNG)) as base, pytest.raises(FetchError) as caught:
        fetch(base + "/0.png", max_bytes=100)
    assert str(caught.value) == f"{len(PNG)} bytes is more than the 100 bytes allowed"


def test_reading_stops_past_the_cap_without_a_length() -> None:
    sent: list[int] = []

    def endless(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n")
        conn.sendall(PNG)
        chunk = b"\x00" * 65536
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            conn.sendall(chunk)
            sent.append(len(chunk))

    with raw_http_server(endless) as base, pytest.raises(FetchError) as caught:
        fetch(base + "/0.png", max_bytes=200_000)
    assert str(caught.value) == "more than the 200000 bytes allowed"


@pytest.mark.parametrize(
    ("content_type", "body", "message"),
    [
        ("text/html", b"<html>expired</html>", "content type 'text/html' is not image/*"),
        ("", PNG, "content type 'missing' is not image/*"),
        (
            "image/png",
            b"GIF89a" + b"\x00" * 40,
            "not a JPEG, PNG or WebP image (checked by content)",
        ),
        ("image/png", PNG[: len(PNG) // 2], "not a whole PNG image (cut short or malformed)"),
        (
            "image/png",
            b"\x89PNG\r\n\x1a\n<html><body>This link has expired</body></html>",
            "not a whole PNG image (cut short or malformed)",
        ),
        ("image/jpeg", JPEG[:-2], "not a whole JPG image (cut short or malformed)"),
        (
            "image/webp",
            b"RIFF" + (100).to_bytes(4, "little") + b"WEBPVP8 " + b"\x00" * 20,
            "not a whole WEBP image (cut short or malformed)",
        ),
    ],
)
def test_what_is_not_an_image_is_refused(content_type: str, body: bytes, message: str) -> None:
    with raw_http_server(answer_with(body, content_type)) as base, pytest.raises(FetchError) as e:
        fetch(base + "/0.png")
    assert str(e.value) == message


def test_an_error_status_is_a_failed_fetch() -> None:
    gone = answer_with(b"gone", "text/plain", "404 Not Found")
    with raw_http_server(gone) as base, pytest.raises(FetchError) as caught:
        fetch(base + "/0.png")
    assert str(caught.value) == "HTTP 404"


def test_a_slow_body_ends_at_the_total_deadline() -> None:
    def trickle(conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n" + PNG[:8]
        )
        for _ in range(50):  # one byte every 0.2 s: no read ever times out
            time.sleep(0.2)
            conn.sendall(b"\x00")

    started = time.monotonic()
    with raw_http_server(trickle) as base, pytest.raises(FetchError) as caught:
        fetch(base + "/0.png", timeout_s=1.0)
    assert str(caught.value) == "no answer within 1 s"
    assert time.monotonic() - started < 3


def test_a_redirect_is_followed_on_http(tmp_path: Path) -> None:
    with raw_http_server(answer_with(PNG)) as target:
        redirect = answer_with(b"", "text/plain", "302 Found", f"Location: {target}/real.png\r\n")
        with raw_http_server(redirect) as base:
            assert fetch(base + "/0.png") == PNG


@pytest.mark.parametrize(
    "location", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "gopher://127.0.0.1:70/x"]
)
def test_a_redirect_off_http_is_not_followed(location: str) -> None:
    redirect = answer_with(b"", "text/plain", "302 Found", f"Location: {location}\r\n")
    with raw_http_server(redirect) as base, pytest.raises(FetchError) as caught:
        fetch(base + "/0.png")
    assert str(caught.value) == "not an http(s) URL" and caught.value.permanent


def test_only_http_urls_are_fetched() -> None:
    with pytest.raises(FetchError, match="not an http"):
        fetch("file:///etc/hostname")


def test_an_error_never_names_the_url() -> None:
    secret = "X-Amz-Signature=deadbeefcafe"
    forbidden = answer_with(b"no", "text/plain", "403 Forbidden")
    with raw_http_server(forbidden) as base, pytest.raises(FetchError) as caught:
        fetch(f"{base}/0.png?{secret}")
    assert secret not in str(caught.value) and "127.0.0.1" not in str(caught.value)


def test_a_directory_write_is_atomic_and_idempotent(tmp_path: Path) -> None:
    store = DirectoryArchive(tmp_path / "archive")
    location = store.put("job-1/0.png", PNG, "image/png")
    assert location == (tmp_path / "archive" / "job-1" / "0.png").as_uri()
    assert store.put("job-1/0.png", PNG, "image/png") == location
    assert (tmp_path / "archive" / "job-1" / "0.png").read_bytes() == PNG
    # No temporary file is left behind.
    assert os.listdir(tmp_path / "archive" / "job-1") == ["0.png"]
    digest = hashlib.sha256((tmp_path / "archive" / "job-1" / "0.png").read_bytes()).hexdigest()
    assert digest == hashlib.sha256(PNG).hexdigest()


@pytest.mark.parametrize("name", ["../x.png", "job/../../x.png", "/abs.png", "job/", "a/b/c.png"])
def test_a_name_outside_the_job_directory_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        DirectoryArchive(tmp_path).put(name, PNG, "image/png")


def test_the_archive_url_picks_the_store(tmp_path: Path) -> None:
    assert archive_store(Settings(remix_archive_url=None)) is None
    directory = archive_store(Settings(remix_archive_url=tmp_path.as_uri()))
    assert isinstance(directory, DirectoryArchive) and directory.root == tmp_path
    s3 = archive_store(
        Settings(
            remix_archive_url="s3://results-bucket/remixq/archive",
            remix_archive_s3_endpoint_url="http://127.0.0.1:9",
        )
    )
    assert isinstance(s3, S3Archive)
    assert (s3.bucket, s3.key_of("j/0.png")) == ("results-bucket", "remixq/archive/j/0.png")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://example.test/dir", "must be file:///absolute/dir or s3://bucket/prefix"),
        ("/var/archive", "must be file:///absolute/dir or s3://bucket/prefix"),
        ("file://host/dir", "a file:// URL must name an absolute directory (file:///dir)"),
        ("s3://", "an s3:// URL must name a valid bucket (s3://bucket/prefix)"),
        ("s3://Bad_Bucket/x", "an s3:// URL must name a valid bucket (s3://bucket/prefix)"),
        ("file:///srv/arch%00ive", "a store URL must not hold a control character (such as %00)"),
        ("s3://bucket/a%0Ab", "a store URL must not hold a control character (such as %00)"),
    ],
)
def test_a_bad_archive_url_is_refused_in_one_line(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(remix_archive_url=url)
    assert str(caught.value) == f"invalid configuration: REMIX_ARCHIVE_URL: {message}"


def test_archiving_is_off_unless_the_url_is_set() -> None:
    assert not load_settings(remix_archive_url="").archive_enabled
    assert load_settings(remix_archive_url="file:///srv/archive").archive_enabled


def test_private_result_hosts_are_off_unless_the_setting_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("REMIX_ARCHIVE_ALLOW_PRIVATE", raising=False)
    assert load_settings().remix_archive_allow_private is False
    monkeypatch.setenv("REMIX_ARCHIVE_ALLOW_PRIVATE", "1")
    assert load_settings().remix_archive_allow_private is True


def test_the_s3_secret_key_is_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-for-the-test")
    assert "aws-secret-for-the-test" in load_settings().secrets()


def test_a_directory_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the archive should be")
    with pytest.raises(ArchiveError) as caught:
        DirectoryArchive(blocker).put("job-1/0.png", PNG, "image/png")
    assert str(caught.value).startswith(f"cannot write {blocker}/job-1/0.png (")
    assert "\n" not in str(caught.value)


def test_an_archive_step_ends_before_the_broker_redelivers_its_message() -> None:
    settings = load_settings(remix_broker_visibility_timeout_s=120, remix_archive_timeout_s=60)
    assert settings.archive_step_s == 60
    with pytest.raises(ConfigurationError) as caught:
        load_settings(remix_broker_visibility_timeout_s=120, remix_archive_timeout_s=61)
    assert "REMIX_ARCHIVE_TIMEOUT_S must be at most REMIX_BROKER_VISIBILITY_TIMEOUT_S" in str(
        caught.value
    )


# ------------------------------------------------------------------ the outbound guard

IMAGE: Reply = (200, {"Content-Type": "image/png"}, PNG)


def test_a_result_name_that_resolves_to_loopback_is_refused_without_a_connection(
    network: Network,
) -> None:
    with recorder({"/0.png": IMAGE}) as internal:
        network.answer("cdn.example", ["127.0.0.1"])
        with pytest.raises(FetchError) as caught:
            fetch(f"http://cdn.example:{internal.port}/0.png", guard=Guard())
    assert str(caught.value) == "refused: not a public address" and caught.value.permanent
    assert internal.connections == 0 and network.connects == []


@pytest.mark.parametrize(
    "location", ["http://127.0.0.1:{port}/0.png", "http://169.254.169.254/latest/meta-data/"]
)
def test_a_redirect_to_a_private_address_is_refused(network: Network, location: str) -> None:
    with recorder({"/0.png": IMAGE}) as internal, recorder() as standin:
        standin.replies["/0.png"] = redirect_to(location.format(port=internal.port))
        network.route(PUBLIC, standin.port)
        network.answer("cdn.example", [PUBLIC])
        with pytest.raises(FetchError) as caught:
            fetch("http://cdn.example/0.png", guard=Guard())
    assert str(caught.value) == "refused: not a public address"
    assert internal.connections == 0 and network.connects == [PUBLIC]


def test_proxy_variables_are_ignored(network: Network, monkeypatch: pytest.MonkeyPatch) -> None:
    with recorder() as proxy, recorder({"/0.png": IMAGE}) as standin:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
            monkeypatch.setenv(name, proxy.url())
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        network.route(PUBLIC, standin.port)
        network.answer("cdn.example", [PUBLIC])
        data = fetch("http://cdn.example/0.png", guard=Guard())
    assert data == PNG
    assert proxy.connections == 0 and network.connects == [PUBLIC]
