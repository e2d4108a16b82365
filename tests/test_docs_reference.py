"""The reference pages of docs/ checked against the code, so that they cannot drift.

* docs/configuration.md has one table row per setting of ``worker.settings.Settings`` (its
  environment name, ``*_FILE`` variants included) with the setting's default, and no row
  for anything else;
* docs/http.md lists every route of the HTTP app, and no other;
* docs/cli.md lists every ``remixq`` subcommand with each option and argument, and no other;
* every relative link of README.md and docs/*.md names a file that exists (and a heading
  or anchor there), and the README stays short.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from pydantic import AliasChoices

from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
CONFIGURATION = DOCS / "configuration.md"
HTTP = DOCS / "http.md"
CLI = DOCS / "cli.md"
README_MAX_LINES = 320

#: A table row's first cell when it is one backticked name: ``| `NAME` | ...``.
_FIRST_CELL = re.compile(r"^\|\s*`([^`]+)`\s*\|", re.M)
_HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
_HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.I)


def table_rows(text: str) -> list[tuple[str, list[str]]]:
    """Each table row whose first cell is one backticked name: (name, the other cells)."""
    rows = []
    for line in text.splitlines():
        match = _FIRST_CELL.match(line)
        if match:
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[2:-1]]
            rows.append((match.group(1), cells))
    return rows


# ------------------------------------------------------------------ settings


def env_names(name: str, field: Any) -> list[str]:
    """The environment variables a settings field is read from."""
    alias = field.validation_alias
    if isinstance(alias, str):
        return [alias.upper()]
    if isinstance(alias, AliasChoices):
        return [choice.upper() for choice in alias.choices if isinstance(choice, str)]
    prefix = str(Settings.model_config.get("env_prefix") or "")
    return [(prefix + name).upper()]


def settings_by_env() -> dict[str, Any]:
    """Every environment name of a setting -> its field."""
    found = {}
    for name, field in Settings.model_fields.items():
        for env in env_names(name, field):
            found[env] = field
    return found


def shown_default(value: Any) -> str:
    """A default as the reference writes it (``5.0`` as ``5``, ``False`` as ``false``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def documented_settings() -> dict[str, list[str]]:
    return dict(table_rows(CONFIGURATION.read_text()))


def test_every_setting_has_a_row_in_the_configuration_reference() -> None:
    documented = documented_settings()
    missing = {env: field for env, field in settings_by_env().items() if env not in documented}
    rows = "\n".join(
        f"  | `{env}` | {shown_default(field.default) if field.default is not None else 'unset'} "
        "| ... | ... |"
        for env, field in sorted(missing.items())
    )
    assert not missing, (
        f"settings of worker/settings.py missing from {CONFIGURATION.relative_to(ROOT)}: "
        f"{', '.join(sorted(missing))}; add a row for each:\n{rows}"
    )


def test_the_configuration_reference_lists_nothing_but_settings() -> None:
    extra = sorted(set(documented_settings()) - set(settings_by_env()))
    assert not extra, (
        f"{CONFIGURATION.relative_to(ROOT)} has rows for what is not a setting of "
        f"worker/settings.py: {', '.join(extra)}"
    )


def test_the_configuration_reference_shows_each_default() -> None:
    documented = documented_settings()
    wrong = []
    for env, field in settings_by_env().items():
        if env not in documented or not documented[env]:
            continue
        cell = documented[env][0]
        if field.default is None:
            if not cell.startswith(("unset", "same as")):
                wrong.append(f"{env}: default is unset, the row says {cell!r}")
        elif f"`{shown_default(field.default)}`" not in cell:
            wrong.append(
                f"{env}: default is `{shown_default(field.default)}`, the row says {cell!r}"
            )
    assert not wrong, "\n".join(wrong)


# ------------------------------------------------------------------ HTTP routes


def _walk_routes(routes: Iterable[Any]) -> Iterator[tuple[str, str]]:
    for route in routes:
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if path is not None and methods:
            for method in set(methods) - {"HEAD", "OPTIONS"}:
                yield method, path
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        yield from _walk_routes(inner or getattr(route, "routes", None) or ())


def app_routes() -> set[str]:
    """``METHOD /path`` of every route the HTTP app serves (its schema's and the others)."""
    from producers.http import app

    found = {
        f"{method.upper()} {path}"
        for path, operations in app.openapi()["paths"].items()
        for method in operations
        if method.upper() in _HTTP_METHODS
    }
    found |= {f"{method} {path}" for method, path in _walk_routes(app.routes)}
    return found


def documented_routes() -> set[str]:
    found = set()
    for name, _ in table_rows(HTTP.read_text()):
        method, _, target = name.partition(" ")
        if method in _HTTP_METHODS and target.startswith("/"):
            found.add(f"{method} {target.split('?')[0]}")
    return found


def test_every_route_of_the_http_app_is_in_the_http_reference() -> None:
    missing = sorted(app_routes() - documented_routes())
    assert not missing, f"routes missing from {HTTP.relative_to(ROOT)}: {missing}"


def test_the_http_reference_lists_only_routes_the_app_serves() -> None:
    extra = sorted(documented_routes() - app_routes())
    assert not extra, f"{HTTP.relative_to(ROOT)} lists routes the app does not serve: {extra}"


# ------------------------------------------------------------------ the CLI


def command_tree() -> dict[str, click.Command]:
    """``remixq ...`` -> its command, for the group and every subcommand (nested too)."""
    from producers.cli import main

    found: dict[str, click.Command] = {}

    def visit(path: str, command: click.Command) -> None:
        found[path] = command
        if isinstance(command, click.Group):
            ctx = click.Context(command, info_name=path)
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None, f"{path} {name} cannot be loaded"
                visit(f"{path} {name}", sub)

    visit("remixq", main)
    return found


def parameter_names(command: click.Command) -> set[str]:
    """A command's options (every ``--long`` spelling) and arguments (upper case)."""
    names = set()
    for param in command.params:
        if isinstance(param, click.Argument):
            names.add(str(param.name).upper())
        else:
            names |= {opt for opt in [*param.opts, *param.secondary_opts] if opt.startswith("--")}
    return names


def cli_sections() -> list[tuple[list[str], set[str]]]:
    """Each section of docs/cli.md whose heading names commands: (the commands, the option
    and argument names its tables list)."""
    sections = []
    for chunk in re.split(r"^## ", CLI.read_text(), flags=re.M)[1:]:
        heading, _, body = chunk.partition("\n")
        commands = re.findall(r"`(remixq(?: [a-z][a-z-]*)*)`", heading)
        if commands:
            names = {name.split()[0] for name, _ in table_rows(body)}
            sections.append((commands, names))
    return sections


def test_every_command_and_option_is_in_the_cli_reference() -> None:
    sections = cli_sections()
    problems = []
    for path, command in command_tree().items():
        listed = [names for commands, names in sections if path in commands]
        if not listed:
            problems.append(f"no section for `{path}`")
            continue
        missing = sorted(parameter_names(command) - set().union(*listed))
        if missing:
            problems.append(f"`{path}`: {', '.join(missing)} not listed")
    assert not problems, f"{CLI.relative_to(ROOT)}: " + "; ".join(problems)


def test_the_cli_reference_lists_only_what_the_commands_take() -> None:
    tree = command_tree()
    problems = []
    for commands, names in cli_sections():
        unknown = [path for path in commands if path not in tree]
        problems += [f"`{path}` is not a command" for path in unknown]
        taken = set().union(*(parameter_names(tree[path]) for path in commands if path in tree))
        extra = sorted(names - taken)
        if extra:
            problems.append(f"{', '.join(commands)}: {', '.join(extra)} not taken")
    assert not problems, f"{CLI.relative_to(ROOT)}: " + "; ".join(problems)


# ------------------------------------------------------------------ links


def without_code(text: str) -> str:
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"<[^>]+>", "", heading).replace("`", "").strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    found: set[str] = set(_HTML_ANCHOR.findall(text))
    seen: dict[str, int] = {}
    for heading in _HEADING.findall(text):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in _LINK.findall(without_code(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # http:, https:, mailto: ...
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading or anchor #{anchor}")
    return broken


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_readme_stays_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move reference text to docs/"
    )


def test_the_link_check_sees_a_broken_link_and_a_missing_anchor(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## A section: with `code`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-section-with-code) [gone](missing.md) [bad](other.md#nowhere)\n"
        "[web](https://example.com/x) `[in code](missing.md)`\n"
        "```\n[in a block](missing.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#nowhere: no heading or anchor #nowhere",
    ]
