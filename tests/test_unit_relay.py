"""The legacy remix relay's request model, answer parsing and settings, with plain data."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.models import InvalidRequestError, validate_request
from worker.settings import DEFAULT_IDEOGRAM_STATE_MAP, ConfigurationError, load_settings
from worker.settings import parse_state_map as parse_map
from worker.upstreams.errors import (
    BadAnswerError,
    InsufficientCreditsError,
    MaintenanceError,
    RateLimitedError,
    ServerError,
    UnauthorizedError,
    UnexpectedCodeError,
    ValidationFailedError,
)
from worker.upstreams.relay import parse_remix_answer, parse_status, relay_error_from_response

RELAY = "ideogram-remix"
REF = {
    "blob": "abc123",
    "content_type": "image/png",
    "size": 10,
    "sha256": "0" * 64,
    "name": "src.png",
}
STATE_MAP = parse_map(DEFAULT_IDEOGRAM_STATE_MAP)


def relay_error(**fields: Any) -> str:
    with pytest.raises(InvalidRequestError) as caught:
        validate_request({"prompt": "a cat", "image_file": REF, **fields}, RELAY)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("invalid request: ")
    return message


# ------------------------------------------------------------------ the request model


def test_a_minimal_request_gets_the_relays_defaults() -> None:
    request = validate_request({"prompt": "a cat", "image_file": REF}, RELAY)
    assert request.upstream_input() == {
        "prompt": "a cat",
        "image_file": REF,
        "image_weight": 50,
        "model": "V_2",
    }
    assert request.image_request() == {"prompt": "a cat", "image_weight": 50, "model": "V_2"}  # type: ignore[union-attr]


def test_every_documented_field_is_taken() -> None:
    fields = {
        "aspect_ratio": "ASPECT_16_9",
        "color_palette": {"members": [{"color_hex": "#1A2B3C", "color_weight": 0.5}]},
        "image_weight": 100,
        "magic_prompt_option": "OFF",
        "model": "V_1_TURBO",
        "negative_prompt": "blur",
        "num_images": 8,
        "seed": 2**31 - 1,
        "style_type": "RENDER_3D",
    }
    request = validate_request({"prompt": "a cat", "image_file": REF, **fields}, RELAY)
    assert request.upstream_input() == {"prompt": "a cat", "image_file": REF, **fields}


def test_aspect_ratio_with_resolution_is_refused() -> None:
    message = relay_error(aspect_ratio="ASPECT_1_1", resolution="RESOLUTION_1024_1024")
    assert "aspect_ratio and resolution cannot be given together" in message


def test_a_resolution_must_be_one_of_the_relays_names() -> None:
    assert validate_request(
        {"prompt": "x", "image_file": REF, "resolution": "RESOLUTION_1280_768"}, RELAY
    )
    assert "resolution" in relay_error(resolution="1280x768")


@pytest.mark.parametrize(
    "palette",
    [
        {"name": "EMBER", "members": [{"color_hex": "#FFFFFF"}]},
        {},
        {"name": "SUNSET"},
        {"members": [{"color_hex": "FFFFFF"}]},
        {"members": [{"color_hex": "#FFFFFF", "color_weight": 0.01}]},
        {"members": [{"color_hex": "#FFFFFF", "color_weight": True}]},
        {"members": []},
    ],
)
def test_a_palette_is_a_name_or_members_within_bounds(palette: dict[str, Any]) -> None:
    assert "color_palette" in relay_error(color_palette=palette)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_weight", 0),
        ("image_weight", 101),
        ("image_weight", True),
        ("num_images", 9),
        ("num_images", 0),
        ("num_images", "2"),
        ("seed", -1),
        ("seed", 2**31),
        ("seed", False),
        ("model", "V_3"),
        ("style_type", "PHOTO"),
        ("magic_prompt_option", "MAYBE"),
        ("aspect_ratio", "ASPECT_5_4"),
        ("prompt", "   "),
        ("strength", 0.5),
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(field: str, value: Any) -> None:
    assert f"{field}: " in relay_error(**{field: value})


@pytest.mark.parametrize(
    "field", ["image_url", "reference_image_urls", "reference_image_files", "image_urls"]
)
def test_urls_are_refused_saying_image_file_only(field: str) -> None:
    message = relay_error(**{field: "https://example.test/a.png"})
    assert field in message and "image_file only" in message


def test_the_image_file_is_required_and_must_be_a_blob_reference() -> None:
    with pytest.raises(InvalidRequestError, match="image_file: Field required"):
        validate_request({"prompt": "a cat"}, RELAY)
    assert "image_file" in relay_error(image_file={"blob": "x"})


def test_an_unknown_provider_is_one_line_naming_the_known_ones() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        validate_request({"prompt": "a cat"}, "midjourney")
    assert str(caught.value) == (
        "invalid request: provider: must be one of kie, ideogram-remix, not 'midjourney'"
    )


def test_the_kie_model_still_refuses_relay_fields() -> None:
    with pytest.raises(InvalidRequestError, match="image_weight: is not a known input field"):
        validate_request(
            {
                "prompt": "a",
                "image_url": "https://e.test/a.png",
                "reference_image_urls": ["https://e.test/b.png"],
                "image_weight": 50,
            }
        )


# ------------------------------------------------------------------ the relay's answers

SECRET = "sk-relay-very-secret-value"


@pytest.mark.parametrize(
    ("status", "body", "expected", "ambiguous"),
    [
        (429, {"message": "slow down"}, RateLimitedError, False),
        (455, {"message": "maintenance"}, MaintenanceError, False),
        (500, {"message": "boom"}, ServerError, False),
        (503, "<html>Service Unavailable</html>", ServerError, True),
        (401, {"message": "bad key"}, UnauthorizedError, False),
        (402, "out of credits", InsufficientCreditsError, False),
        (422, {"detail": "unsafe prompt"}, ValidationFailedError, False),
        (400, {"code": 400, "message": "aspect_ratio and resolution"}, UnexpectedCodeError, False),
        (200, "<html>ok</html>", BadAnswerError, True),
        (200, {"code": 1003, "message": "internal"}, BadAnswerError, True),
        (200, {"code": "429", "message": "busy"}, RateLimitedError, False),
        (200, {"code": 455, "message": "maintenance"}, MaintenanceError, False),
    ],
)
def test_answers_map_onto_the_typed_errors(
    status: int, body: Any, expected: type, ambiguous: bool
) -> None:
    text = body if isinstance(body, str) else json.dumps(body)
    error, data = relay_error_from_response(status, text, {}, (SECRET,))
    assert isinstance(error, expected) and data is None
    assert error.ambiguous is ambiguous


def test_code_zero_is_success_and_retry_after_is_read() -> None:
    body = {"code": 0, "message": "SUCCEED", "data": {"task_id": "t1"}}
    assert relay_error_from_response(200, json.dumps(body), {}) == (None, body)
    error, _ = relay_error_from_response(429, "{}", {"Retry-After": "7"})
    assert error is not None and error.retry_after == 7.0


def test_upstream_text_is_redacted() -> None:
    body = json.dumps({"message": f"key {SECRET} is invalid"})
    error, _ = relay_error_from_response(401, body, {}, (SECRET,))
    assert error is not None and SECRET not in str(error) and "[redacted]" in str(error)


def test_a_sync_answer_gives_the_images() -> None:
    body = {"created": "2026-01-01", "data": [{"url": "https://r/1.png"}, {"url": "https://r/2"}]}
    answer = parse_remix_answer(body)
    assert answer.result_urls == ["https://r/1.png", "https://r/2"] and answer.task_id is None


def test_the_envelope_gives_a_task_id() -> None:
    body = {"code": 0, "data": {"task_id": 12345, "task_status": "submitted"}}
    answer = parse_remix_answer(body)
    assert answer.task_id == "12345" and answer.result_urls == []


@pytest.mark.parametrize(
    "body",
    [
        {"created": "x", "data": []},
        {"created": "x", "data": [{"prompt": "no url"}]},
        {"code": 0, "data": {"task_status": "submitted"}},
        {"code": 0, "data": {"task_id": ""}},
        {"code": 0, "data": {"task_id": True}},
        {"code": 0},
    ],
)
def test_an_answer_without_images_or_task_id_is_ambiguous(body: Any) -> None:
    with pytest.raises(BadAnswerError) as caught:
        parse_remix_answer(body)
    assert caught.value.ambiguous


@pytest.mark.parametrize(
    "data",
    [
        {"task_status": "SUCCEED", "task_result": {"images": [{"url": "https://r/a.png"}]}},
        {"task_status": "succeed", "data": [{"url": "https://r/a.png"}]},
        {"task_status": "succeed", "result_urls": ["https://r/a.png"]},
    ],
)
def test_a_status_success_reads_urls_from_each_documented_place(data: dict[str, Any]) -> None:
    info = parse_status({"code": 0, "data": data}, "t1", STATE_MAP)
    assert (info.task_id, info.state, info.result_urls) == ("t1", "success", ["https://r/a.png"])


def test_status_states_are_mapped_and_failure_reasons_kept() -> None:
    running = parse_status({"data": {"task_status": "processing"}}, "t1", STATE_MAP)
    assert running.state == "generating"
    failed = parse_status(
        {"data": {"task_status": "failed", "task_status_msg": "nsfw"}}, "t1", STATE_MAP
    )
    assert (failed.state, failed.fail_msg) == ("fail", "nsfw")
    odd = parse_status({"data": {"task_status": "weird"}}, "t1", STATE_MAP)
    assert odd.state == "weird"  # unknown: the poll policy keeps polling


@pytest.mark.parametrize(
    "body", [{"data": {"task_status": "succeed"}}, {"data": {}}, {"data": None}, []]
)
def test_a_status_answer_that_cannot_be_read_is_a_bad_answer(body: Any) -> None:
    with pytest.raises(BadAnswerError):
        parse_status(body, "t1", STATE_MAP)


# ------------------------------------------------------------------ the settings


def test_the_state_map_parses_and_must_name_success_and_fail() -> None:
    assert parse_map("Done=success, ERR=fail, queued=waiting") == {
        "done": "success",
        "err": "fail",
        "queued": "waiting",
    }
    for bad in ("done=success", "done=finished,err=fail", "done,err=fail"):
        with pytest.raises(ValueError):
            parse_map(bad)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ideogram_base_url", "ftp://relay.test", "IDEOGRAM_BASE_URL: must be an http(s) URL"),
        ("ideogram_status_path", "/status", "IDEOGRAM_STATUS_PATH: must be a path"),
        ("ideogram_state_map", "a=b", "IDEOGRAM_STATE_MAP: "),
        ("ideogram_rate_limit", "lots", "IDEOGRAM_RATE_LIMIT: "),
    ],
)
def test_relay_settings_are_checked(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(**{name: value})
    assert message in str(caught.value)


def test_the_lease_covers_the_relays_longest_request() -> None:
    kie_only = load_settings(kie_api_key="k", kie_request_deadline_s=30)
    assert kie_only.lease_s == 45 and kie_only.longest_request_s == 30
    both = load_settings(
        kie_api_key="k",
        ideogram_base_url="http://127.0.0.1:1",
        ideogram_api_key="r",
        ideogram_request_deadline_s=90,
    )
    assert both.lease_s == 105 and both.attempt_settle_s > 90
    with pytest.raises(ConfigurationError, match="IDEOGRAM_REQUEST_DEADLINE_S must be shorter"):
        load_settings(ideogram_base_url="http://127.0.0.1:1", remix_deadline_s=100)


def test_a_request_that_could_outlast_the_brokers_visibility_timeout_is_refused() -> None:
    """A step still waiting for its upstream answer when the broker hands its message to
    another worker would run twice: the settings refuse it, in one line."""
    with pytest.raises(ConfigurationError, match="REMIX_BROKER_VISIBILITY_TIMEOUT_S") as caught:
        load_settings(
            ideogram_base_url="http://127.0.0.1:1",
            ideogram_api_key="r",
            ideogram_request_deadline_s=200,
            remix_deadline_s=900,
        )
    assert "\n" not in str(caught.value)
    raised = load_settings(
        ideogram_base_url="http://127.0.0.1:1",
        ideogram_api_key="r",
        ideogram_request_deadline_s=200,
        remix_broker_visibility_timeout_s=300,
    )
    assert raised.lease_s == 215
