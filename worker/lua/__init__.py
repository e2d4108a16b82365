"""The Lua scripts every atomic Redis change of remixq goes through.

Each ``*.lua`` file starts with a header naming its ``KEYS`` and ``ARGV``; tunable values are
passed as ``ARGV``, never formatted into the script text.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import redis


def load_script(client: redis.Redis, name: str) -> Any:
    """Register ``<name>.lua`` with ``client`` (it is sent by SHA, loaded once per server)."""
    return client.register_script((resources.files(__name__) / f"{name}.lua").read_text())
