"""The Lua scripts every atomic Redis change of remixq goes through.

Each ``*.lua`` file starts with a header naming its ``KEYS`` and ``ARGV``; tunable values are
passed as ``ARGV``, never formatted into the script text. A line ``-- #include <name>.lua``
is replaced by that file's text (functions shared by scripts, such as ``side_work.lua``).
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

import redis


def load_script(client: redis.Redis, name: str) -> Any:
    """Register ``<name>.lua`` with ``client`` (it is sent by SHA, loaded once per server)."""
    return client.register_script(script_text(name))


def script_text(name: str) -> str:
    """The text of ``<name>.lua`` with its ``-- #include`` lines replaced."""
    text = (resources.files(__name__) / f"{name}.lua").read_text()
    return _INCLUDE.sub(lambda found: script_text(found.group(1)), text)


_INCLUDE = re.compile(r"^-- #include (\w+)\.lua$", re.MULTILINE)
