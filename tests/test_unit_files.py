"""Source images given as files: what a producer accepts, and what a request carries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sandbox.images import render_png
from worker.images import MAX_IMAGE_BYTES, load_image
from worker.models import InvalidRequestError, validate_request
from worker.settings import Settings
from worker.store.blobs import new_ref, refs_in
from worker.upstreams.errors import BadAnswerError
from worker.upstreams.kie_upload import parse_download_url

PNG = render_png("unit-files", 0, "unit files", "square")
REF = new_ref(PNG, "image/png", "base.png").model_dump()
URL = "https://example.test/ref.png"


def _one_line_error(source: Any, match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match) as caught:
        load_image(source, "image_file")
    assert "\n" not in str(caught.value) and str(caught.value).startswith(
        "invalid request: image_file"
    )


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    _one_line_error(tmp_path / "nope.png", "no such file")


def test_a_directory_is_refused(tmp_path: Path) -> None:
    _one_line_error(tmp_path, "not a regular file")


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    _one_line_error(tmp_path / "empty.png", "empty")


def test_a_file_one_byte_over_10_mb_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(PNG + b"\0" * (MAX_IMAGE_BYTES + 1 - len(PNG)))
    _one_line_error(big, "more than the 10000000 bytes")


def test_a_text_file_named_png_is_refused(tmp_path: Path) -> None:
    (tmp_path / "fake.png").write_text("hello, I am not an image")
    _one_line_error(tmp_path / "fake.png", "not a whole JPEG, PNG or WebP")


def test_a_png_named_txt_is_accepted_by_its_content(tmp_path: Path) -> None:
    (tmp_path / "photo.txt").write_bytes(PNG)
    assert load_image(tmp_path / "photo.txt", "image_file") == (PNG, "image/png", "photo.png")


def test_bytes_are_checked_like_a_file() -> None:
    assert load_image(PNG, "image_file")[1:] == ("image/png", "image.png")
    _one_line_error(b"GIF89a....", "not a whole JPEG, PNG or WebP")


def test_a_file_may_stand_for_the_source_image_and_is_never_sent_as_such() -> None:
    request = validate_request({"prompt": "p", "image_file": REF, "reference_image_urls": [URL]})

    assert request.stored()["image_file"] == REF
    assert request.upstream_input({REF["blob"]: "https://up.test/a.png"}) == {
        "prompt": "p",
        "image_url": "https://up.test/a.png",
        "reference_image_urls": [URL],
    }
    with pytest.raises(KeyError):
        request.upstream_input()


def test_reference_urls_come_before_reference_files() -> None:
    second = new_ref(PNG, "image/png", "second.png").model_dump()
    request = validate_request(
        {
            "prompt": "p",
            "image_url": URL,
            "reference_image_urls": [URL],
            "reference_image_files": [REF, second],
        }
    )
    uploaded = {REF["blob"]: "https://up.test/1.png", second["blob"]: "https://up.test/2.png"}

    assert request.upstream_input(uploaded)["reference_image_urls"] == [
        URL,
        "https://up.test/1.png",
        "https://up.test/2.png",
    ]
    assert [ref.blob for ref in request.files()] == [REF["blob"], second["blob"]]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"image_url": URL, "image_file": REF, "reference_image_urls": [URL]}, "exactly one of"),
        ({"reference_image_urls": [URL]}, "exactly one of"),
        ({"image_file": REF}, "at least one reference image"),
        ({"image_file": {**REF, "size": 0}, "reference_image_urls": [URL]}, "image_file.size"),
        ({"image_file": {**REF, "data": "AAAA"}, "reference_image_urls": [URL]}, "image_file.data"),
    ],
)
def test_bad_file_fields_are_refused_in_one_line(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message) as caught:
        validate_request({"prompt": "p", **fields})
    assert "\n" not in str(caught.value)


def test_an_unknown_provider_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="provider: must be one of kie"):
        validate_request(
            {"prompt": "p", "image_url": URL, "reference_image_urls": [URL]}, provider="x"
        )


def test_refs_in_finds_the_files_of_a_stored_request_and_skips_junk() -> None:
    request = {"image_file": REF, "reference_image_files": [REF, {"blob": "../x"}, "junk"]}
    assert [ref.blob for ref in refs_in(request)] == [REF["blob"], REF["blob"]]
    assert refs_in(None) == [] and refs_in({"image_url": URL}) == []


def test_an_upload_answer_needs_an_http_download_url() -> None:
    assert parse_download_url({"downloadUrl": "https://f.test/a.png"}) == "https://f.test/a.png"
    for data in (None, {}, {"downloadUrl": 3}, {"downloadUrl": "file:///etc/passwd"}):
        with pytest.raises(BadAnswerError):
            parse_download_url(data)


@pytest.mark.parametrize(
    "url", ["file:///var/lib/remixq/blobs", "s3://bucket/blobs", "s3://bkt", ""]
)
def test_blob_store_urls_accepted(url: str) -> None:
    assert Settings(remix_blob_url=url).remix_blob_url == (url or None)


@pytest.mark.parametrize(
    "url", ["http://example.test/blobs", "file://host/dir", "s3:///nobucket", "blobs"]
)
def test_other_blob_store_urls_stop_the_settings(url: str) -> None:
    with pytest.raises(ValidationError, match=r"file://|s3://"):
        Settings(remix_blob_url=url)
