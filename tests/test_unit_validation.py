"""Every constraint of the character-remix input, checked by RemixRequest."""

from __future__ import annotations

from typing import Any

import pytest

from worker.models import InvalidRequestError, validate_request

VALID: dict[str, Any] = {
    "prompt": "a cat in a spacesuit",
    "image_url": "https://example.test/base.png",
    "reference_image_urls": ["https://example.test/ref.png"],
}


def _with(**changes: Any) -> dict[str, Any]:
    data = dict(VALID)
    for key, value in changes.items():
        if value is ...:
            data.pop(key)
        else:
            data[key] = value
    return data


def test_minimal_request_sends_only_given_fields() -> None:
    assert validate_request(VALID).upstream_input() == VALID


def test_full_request_round_trips() -> None:
    full = _with(
        rendering_speed="QUALITY",
        style="FICTION",
        expand_prompt=False,
        image_size="landscape_16_9",
        num_images="4",
        seed=42,
        strength=0.3,
        negative_prompt="blur",
        image_urls=["https://example.test/style.png"],
        reference_mask_urls="https://example.test/mask.png",
    )
    assert validate_request(full).upstream_input() == full


@pytest.mark.parametrize(("given", "sent"), [(1, "1"), (4, "4"), ("2", "2")])
def test_num_images_accepts_int_and_sends_string(given: Any, sent: str) -> None:
    assert validate_request(_with(num_images=given)).upstream_input()["num_images"] == sent


@pytest.mark.parametrize("strength", [0.1, 0.5, 1, 1.0, 0.7000000000000001])
def test_strength_on_the_grid(strength: float) -> None:
    assert validate_request(_with(strength=strength)).strength == round(strength, 1)


BAD = [
    ("prompt", ...),
    ("prompt", ""),
    ("prompt", "x" * 5001),
    ("prompt", 12),
    ("image_url", ...),
    ("image_url", "not a url"),
    ("image_url", "ftp://example.test/a.png"),
    ("image_url", "https://"),
    ("reference_image_urls", ...),
    ("reference_image_urls", []),
    ("reference_image_urls", ["relative/path.png"]),
    ("reference_image_urls", "https://example.test/ref.png"),
    ("rendering_speed", "FAST"),
    ("style", "ANIME"),
    ("expand_prompt", "maybe"),
    ("image_size", "huge"),
    ("num_images", "5"),
    ("num_images", 0),
    ("num_images", True),
    ("seed", "abc"),
    ("seed", 1.5),
    ("strength", 0.05),
    ("strength", 1.1),
    ("strength", 0.35),
    ("negative_prompt", "n" * 501),
    ("image_urls", ["nope"]),
    ("reference_mask_urls", 5),
    ("colour", "red"),
]


@pytest.mark.parametrize(("field", "value"), BAD, ids=[f"{f}={v!r}"[:40] for f, v in BAD])
def test_each_bad_field_is_refused_in_one_line_naming_it(field: str, value: Any) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        validate_request(_with(**{field: value}))
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "\n" not in message
    assert message.startswith("invalid request: ")
    assert field in message


def test_boundaries_accepted() -> None:
    validate_request(_with(prompt="x" * 5000, negative_prompt="n" * 500, seed=0))


def test_not_an_object() -> None:
    with pytest.raises(InvalidRequestError, match="JSON object"):
        validate_request(["prompt"])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_url", "https://example.test:99999/a.png"),
        ("image_url", "https://:80/a.png"),
        ("strength", True),
        ("prompt", "   \n\t "),
        ("image_urls", []),
        ("seed", 2**80),
        ("seed", -1),
        ("reference_mask_urls", "not a url"),
    ],
)
def test_values_the_upstream_would_refuse_are_refused_here(field: str, value: Any) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        validate_request(_with(**{field: value}))
