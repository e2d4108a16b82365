"""Field checks shared by the request models of both upstreams (:mod:`worker.models`,
:mod:`worker.relay_models`), so that both answer a blank prompt or a boolean number
with the same words."""

from __future__ import annotations

from typing import Any


def not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def not_a_boolean(value: Any) -> Any:
    """JSON's ``true`` is not the number 1 (pydantic would take it for one)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value
