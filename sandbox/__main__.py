"""``python -m sandbox``: the same command as ``remixq sandbox``."""

from sandbox.cli import sandbox_command

if __name__ == "__main__":
    sandbox_command.main(prog_name="python -m sandbox")
