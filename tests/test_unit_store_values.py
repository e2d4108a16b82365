"""How the job store reads back the JSON values it wrote (plain data, no Redis)."""

from __future__ import annotations

import json

import pytest

from worker.store.jobs import decode_json

STORED = ["text", "é ✓ 🖼", 12, 1796660067.194965, None, True, {"prompt": "x", "n": [1, 2.5]}]


@pytest.mark.parametrize("value", STORED)
def test_a_stored_value_reads_back_the_same_from_bytes_or_text(value: object) -> None:
    written = json.dumps(value)
    assert decode_json(written.encode()) == value
    assert decode_json(written) == value


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff", b"1 2"])
def test_a_damaged_value_raises_a_value_error_as_json_loads_does(raw: bytes) -> None:
    with pytest.raises(ValueError):
        decode_json(raw)
    with pytest.raises(ValueError):
        json.loads(raw)
