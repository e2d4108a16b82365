"""createTask body checks (as strict as kie.ai's) and the test directives hidden in prompts."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MODEL = "ideogram/character-remix"
MAX_PROMPT_CHARS = 5000
MAX_NEGATIVE_PROMPT_CHARS = 500
STRENGTH_MIN = 0.1
STRENGTH_MAX = 1.0
STRENGTH_STEPS_PER_UNIT = 10
STEP_TOLERANCE = 1e-9
RENDERING_SPEEDS = ("TURBO", "BALANCED", "QUALITY")
STYLES = ("AUTO", "REALISTIC", "FICTION")
IMAGE_SIZES = (
    "square",
    "square_hd",
    "portrait_4_3",
    "portrait_16_9",
    "landscape_4_3",
    "landscape_16_9",
)
NUM_IMAGES = ("1", "2", "3", "4")
DEFAULT_NUM_IMAGES = "1"
DEFAULT_IMAGE_SIZE = "square_hd"

DIRECTIVE_CODES = frozenset({401, 402, 404, 422, 429, 455, 500, 501, 505})
CREATE_DIRECTIVE = re.compile(r"\[sandbox:create=(\d+)\]")
FAIL_DIRECTIVE = "[sandbox:fail]"
SECONDS_DIRECTIVE = re.compile(r"\[sandbox:seconds=(\d+(?:\.\d*)?|\.\d+)\]")


class RequestError(ValueError):
    """A createTask body the real API would refuse with code 422; the message names the field."""


@dataclass(frozen=True)
class Directives:
    """What a prompt asks of the sandbox.

    :param create_code: answer createTask with this code and create nothing.
    :param fail: the task ends in state ``fail``.
    :param seconds: generation time of this task instead of the configured one.
    """

    create_code: int | None = None
    fail: bool = False
    seconds: float | None = None


def is_http_url(value: Any) -> bool:
    """Whether ``value`` is a string holding an absolute http(s) URL.

    :param value: anything taken from a JSON body.
    """
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _is_url_list(value: Any) -> bool:
    return isinstance(value, list) and all(is_http_url(item) for item in value)


def _is_text(max_chars: int, min_chars: int = 0) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and min_chars <= len(value) <= max_chars


def _is_choice(choices: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and value in choices


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_strength(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return False
    steps = value * STRENGTH_STEPS_PER_UNIT
    on_step = abs(steps - round(steps)) < STEP_TOLERANCE
    return STRENGTH_MIN - STEP_TOLERANCE <= value <= STRENGTH_MAX + STEP_TOLERANCE and on_step


def _choices(choices: tuple[str, ...]) -> str:
    return "must be one of " + ", ".join(choices)


#: (field, required, check, what the message says the field must be)
INPUT_RULES: tuple[tuple[str, bool, Callable[[Any], bool], str], ...] = (
    ("prompt", True, _is_text(MAX_PROMPT_CHARS, 1), f"must be 1..{MAX_PROMPT_CHARS} characters"),
    ("image_url", True, is_http_url, "must be an http(s) URL"),
    (
        "reference_image_urls",
        True,
        lambda value: _is_url_list(value) and len(value) > 0,
        "must be a non-empty list of http(s) URLs",
    ),
    ("rendering_speed", False, _is_choice(RENDERING_SPEEDS), _choices(RENDERING_SPEEDS)),
    ("style", False, _is_choice(STYLES), _choices(STYLES)),
    ("expand_prompt", False, lambda value: isinstance(value, bool), "must be a boolean"),
    ("image_size", False, _is_choice(IMAGE_SIZES), _choices(IMAGE_SIZES)),
    ("num_images", False, _is_choice(NUM_IMAGES), 'must be one of the strings "1".."4"'),
    ("seed", False, _is_int, "must be an integer"),
    ("strength", False, _is_strength, "must be a number from 0.1 to 1 in steps of 0.1"),
    (
        "negative_prompt",
        False,
        _is_text(MAX_NEGATIVE_PROMPT_CHARS),
        f"must be a string of at most {MAX_NEGATIVE_PROMPT_CHARS} characters",
    ),
    ("image_urls", False, _is_url_list, "must be a list of http(s) URLs"),
    ("reference_mask_urls", False, lambda value: isinstance(value, str), "must be a string"),
)


def validate_create_body(body: Any) -> dict[str, Any]:
    """Check a parsed createTask body and return its ``input`` object.

    :param body: the parsed JSON body.
    :raises RequestError: naming the first field that is missing or wrong.
    """
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    if body.get("model") != MODEL:
        raise RequestError(f"model must be {MODEL!r}")
    callback = body.get("callBackUrl")
    if callback is not None and not is_http_url(callback):
        raise RequestError("callBackUrl must be an http(s) URL")
    task_input = body.get("input")
    if not isinstance(task_input, dict):
        raise RequestError("input is required and must be an object")
    for name, required, check, expectation in INPUT_RULES:
        if name not in task_input:
            if required:
                raise RequestError(f"input.{name} is required")
        elif not check(task_input[name]):
            raise RequestError(f"input.{name} {expectation}")
    return task_input


def parse_directives(prompt: str) -> Directives:
    """Read the ``[sandbox:...]`` directives of a prompt.

    :param prompt: a validated prompt.
    :raises RequestError: for ``[sandbox:create=NNN]`` with a code the API never answers.
    """
    create = CREATE_DIRECTIVE.search(prompt)
    code = int(create.group(1)) if create else None
    if code is not None and code not in DIRECTIVE_CODES:
        allowed = ", ".join(str(item) for item in sorted(DIRECTIVE_CODES))
        raise RequestError(f"[sandbox:create={code}] must name one of {allowed}")
    seconds = SECONDS_DIRECTIVE.search(prompt)
    return Directives(
        create_code=code,
        fail=FAIL_DIRECTIVE in prompt,
        seconds=float(seconds.group(1)) if seconds else None,
    )


def peek_prompt(body: Any) -> str | None:
    """The prompt of a parsed createTask body when it has one, without validating anything.

    :param body: the parsed JSON body, possibly of any shape.
    """
    task_input = body.get("input") if isinstance(body, dict) else None
    prompt = task_input.get("prompt") if isinstance(task_input, dict) else None
    return prompt if isinstance(prompt, str) else None
