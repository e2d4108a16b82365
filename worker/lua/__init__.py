"""The Lua scripts every atomic Redis change of remixq goes through.

Each ``*.lua`` file starts with a header naming its ``KEYS`` and ``ARGV``; tunable values are
passed as ``ARGV``, never formatted into the script text. A line ``-- #include <name>.lua``
is replaced by that file's text (functions shared by scripts, such as ``side_work.lua``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis


def load_script(client: redis.Redis, name: str) -> Any:
    """Register ``<name>.lua`` with ``client`` (it is sent by SHA, loaded once per server)."""
    return client.register_script(script_text(name))


def queue_by_sha(pipe: Any, script: Any, script_keys: Sequence[str], args: Sequence[Any]) -> None:
    """Queue ``script`` on the pipeline ``pipe`` by its SHA alone.

    redis-py's own way (``script(keys=..., args=..., client=pipe)``) first asks the server
    whether it knows the script, one more round trip for each pipeline. The caller instead
    runs the script again by itself (which loads it) when the pipeline answers
    ``NoScriptError``: then the server knew none of it, and nothing of it ran.
    """
    pipe.evalsha(script.sha, len(script_keys), *script_keys, *args)


def script_text(name: str) -> str:
    """The text of ``<name>.lua`` with its ``-- #include`` lines replaced."""
    text = (resources.files(__name__) / f"{name}.lua").read_text()
    return _INCLUDE.sub(lambda found: script_text(found.group(1)), text)


_INCLUDE = re.compile(r"^-- #include (\w+)\.lua$", re.MULTILINE)
