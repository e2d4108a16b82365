"""A producer install (``pip install remixq``, no extra): the ``remixq`` command's help.

The commands of the ``sandbox`` extra (``remixq sandbox``, ``remixq demo``) are imported
only when used (``producers.cli.LAZY_COMMANDS``). Without their extra, ``remixq --help``,
bare ``remixq`` and every subcommand's ``--help`` still answer (exit 0); only running one
of those commands fails, with one line naming the extra. Checked twice: in this process
with a lazy command whose module is missing, and for real in a fresh virtualenv where
pip installed this source tree without extras (built once for the module).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from producers import cli

ROOT = Path(__file__).resolve().parent.parent
#: What pip needs to build the project (the rest of the tree is not packaged).
PACKAGED = ("pyproject.toml", "README.md", "LICENSE", "worker", "producers", "sandbox")
#: A module of each extra: none may be importable in the bare install.
EXTRA_MODULES = ("PIL", "fastapi", "uvicorn", "flower", "tenacity", "hiredis", "boto3", "gevent")
INSTALL_TIMEOUT_S = 300
RUN_TIMEOUT_S = 60
MISSING = "sandbox.not_installed_here"


def subcommands() -> list[str]:
    with click.Context(cli.main) as ctx:
        return cli.main.list_commands(ctx)


# --- in this process: a lazy command whose module cannot be imported -----------------


@pytest.fixture
def missing_extra(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(cli.LAZY_COMMANDS, "sandbox", (MISSING, "sandbox_command", "sandbox"))
    return "sandbox"


@pytest.mark.parametrize("args", [["--help"], []])
def test_the_groups_help_lists_a_command_whose_extra_is_missing(
    missing_extra: str, args: list[str]
) -> None:
    result = CliRunner().invoke(cli.main, args, prog_name="remixq")
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.stdout.splitlines() if line.split()[:1] == [missing_extra]]
    assert "pip install 'remixq[sandbox]'" in line


def test_the_help_of_a_command_whose_extra_is_missing_names_the_extra(
    missing_extra: str,
) -> None:
    result = CliRunner().invoke(cli.main, [missing_extra, "--help"], prog_name="remixq")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Usage: remixq {missing_extra} ")
    assert "needs the sandbox extra" in result.stdout


def test_running_a_command_whose_extra_is_missing_fails_in_one_line(missing_extra: str) -> None:
    result = CliRunner().invoke(cli.main, [missing_extra, "--port", "8090"], prog_name="remixq")
    assert result.exit_code == cli.EXIT_BAD_INPUT
    assert result.stdout == ""
    assert result.stderr == (
        f"error: remixq {missing_extra} needs the sandbox extra: "
        f"pip install 'remixq[sandbox]' ({MISSING} is missing)\n"
    )


# --- for real: a virtualenv with remixq and no extra ----------------------------------


@pytest.fixture(scope="module")
def bare_bin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The bin directory of a fresh virtualenv holding ``pip install <this tree>``.

    pip builds from a copy, so that its build files stay out of the working tree; it
    reuses pip's cache and configuration. The venv gets no pip of its own: this one's
    installs into it (``pip --python``).
    """
    base = tmp_path_factory.mktemp("bare-install")
    source, venv = base / "src", base / "venv"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PACKAGED:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(path, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        check=True,
        timeout=RUN_TIMEOUT_S,
    )
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
    install = subprocess.run(
        [*pip, "install", "--quiet", "--disable-pip-version-check", str(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    yield venv / "bin"


def run(bin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``bin_dir/args[0] args[1:]`` with nothing but the venv on PATH, away from this tree."""
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "HOME": os.environ.get("HOME", "/")}
    return subprocess.run(
        [str(bin_dir / args[0]), *args[1:]],
        cwd=bin_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


@pytest.mark.integration
def test_the_bare_install_has_no_extra(bare_bin: Path) -> None:
    probe = "import importlib.util as u, sys; print(*[m for m in sys.argv[1:] if u.find_spec(m)])"
    result = run(bare_bin, "python", "-c", probe, *EXTRA_MODULES)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []
    assert run(bare_bin, "python", "-c", "import producers, worker.settings").returncode == 0


@pytest.mark.integration
def test_the_installed_metadata_names_the_licence(bare_bin: Path) -> None:
    probe = "from importlib import metadata as m; d = m.distribution('remixq'); "
    probe += "print(d.metadata['License-Expression'], *sorted(d.metadata.get_all('License-File')))"
    result = run(bare_bin, "python", "-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["MIT", "LICENSE"]


@pytest.mark.integration
@pytest.mark.parametrize("args", [("--help",), ()], ids=["--help", "bare"])
def test_remixq_answers_with_its_help_on_a_bare_install(
    bare_bin: Path, args: tuple[str, ...]
) -> None:
    result = run(bare_bin, "remixq", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: remixq ")
    listed = {line.split()[0] for line in result.stdout.split("Commands:")[1].splitlines() if line}
    assert listed == set(subcommands())


@pytest.mark.integration
def test_every_subcommands_help_answers_on_a_bare_install(bare_bin: Path) -> None:
    for name in subcommands():
        result = run(bare_bin, "remixq", name, "--help")
        assert result.returncode == 0, f"remixq {name} --help: {result.stderr}"
        assert result.stdout.startswith(f"Usage: remixq {name} "), result.stdout
        assert result.stderr == "", result.stderr


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(cli.LAZY_COMMANDS))
def test_a_command_of_a_missing_extra_fails_in_one_line(bare_bin: Path, name: str) -> None:
    extra = cli.LAZY_COMMANDS[name][2]
    result = run(bare_bin, "remixq", name)
    assert result.returncode == cli.EXIT_BAD_INPUT
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: remixq {name} needs the {extra} extra: ")
    assert f"pip install 'remixq[{extra}]'" in line
