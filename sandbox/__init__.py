"""A local stand-in for the kie.ai API (``ideogram/character-remix``) with fault injection.

Serves createTask, recordInfo, the credit balance, result images and callbacks on
127.0.0.1 only, for development, demos, tests and benchmarks.
"""

from sandbox.config import SandboxConfig
from sandbox.control import SandboxControl
from sandbox.server import SandboxServer

__all__ = ["SandboxConfig", "SandboxControl", "SandboxServer"]
