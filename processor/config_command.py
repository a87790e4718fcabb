"""`trace-processor config`: the effective settings, secrets masked, and what is wrong with them.

- ``trace-processor config`` prints every setting of the worker and of the local stack with its
  environment variable, its value and where the value came from (environment, ``.env`` or
  default). Secrets show as ``********``, passwords in URLs too.
- When something is wrong it prints one line per problem instead, names the variable and what
  to do, and exits with status 2. A variable with the ``PROCESSOR_`` or ``STACK_`` prefix that
  is no setting (a typo the settings class would silently ignore) is a problem too.
- ``trace-processor config --markdown`` prints the settings tables of the README, generated
  from the settings classes; ``tests/unit/test_settings_docs.py`` keeps the README in step.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from dotenv import dotenv_values
from pydantic import AliasChoices, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, SettingsError
from rich.console import Console
from rich.table import Table

from processor.settings import StackSettings, WorkerSettings
from processor.worker.logging_setup import MASK, SecretMasker

EXIT_INVALID = 2
README_START = "<!-- settings:start -->"
README_END = "<!-- settings:end -->"
PREFIXES = ("PROCESSOR_", "STACK_")


@dataclass(frozen=True, slots=True)
class SettingsGroup:
    title: str
    cls: type[BaseSettings]


GROUPS = (
    SettingsGroup("Worker (`trace-processor worker`, `topics create`, `config`)", WorkerSettings),
    SettingsGroup("Local stack (`trace-processor stack`, `demo`)", StackSettings),
)


# -- names ---------------------------------------------------------------------------------


def env_names(cls: type[BaseSettings], name: str) -> list[str]:
    """The environment variables that set field ``name``, the documented one first."""
    info = cls.model_fields[name]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice).upper() for choice in alias.choices if isinstance(choice, str)]
    if isinstance(alias, str):
        return [alias.upper()]
    prefix = str(cls.model_config.get("env_prefix", ""))
    return [f"{prefix}{name}".upper()]


def env_name(cls: type[BaseSettings], name: str) -> str:
    return env_names(cls, name)[0]


def known_variables() -> set[str]:
    return {
        variable
        for group in GROUPS
        for name in group.cls.model_fields
        for variable in env_names(group.cls, name)
    }


# -- the documentation table ---------------------------------------------------------------


def _portable_path(path: Path) -> str:
    """A default path as the README shows it on every machine."""
    text = str(path)
    temporary = tempfile.gettempdir()
    home = str(Path.home())
    if text == temporary or text.startswith(temporary + os.sep):
        return "$TMPDIR" + text[len(temporary) :]
    if text == home or text.startswith(home + os.sep):
        return "~" + text[len(home) :]
    return text


def default_text(info: FieldInfo) -> str:
    """The default of a setting as its environment variable would spell it."""
    if info.default_factory is not None:
        value: Any = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path):
        return f"`{_portable_path(value)}`"
    if isinstance(value, list | tuple | dict):
        return f"`{json.dumps(value)}`"
    if value == "":
        return '`""`'
    return f"`{value}`"


def _cell(text: str) -> str:
    parts = text.replace("|", "\\|").replace("\n", " ").split("`")
    # Outside code spans "<endpoint>" would vanish as an unknown HTML tag and "__overflow__"
    # would turn bold; a backslash keeps them as written.
    return "`".join(
        p if i % 2 else p.replace("<", "\\<").replace("__", "\\_\\_") for i, p in enumerate(parts)
    )


def settings_markdown() -> str:
    """The settings tables of the README (between the settings markers)."""
    lines: list[str] = []
    for group in GROUPS:
        if lines:
            lines.append("")
        lines += [
            f"### {group.title}",
            "",
            "| variable | default | meaning |",
            "| --- | --- | --- |",
        ]
        for name, info in group.cls.model_fields.items():
            lines.append(
                f"| `{env_name(group.cls, name)}` | {_cell(default_text(info))} "
                f"| {_cell(info.description or '')} |"
            )
    lines += [
        "",
        "`$TMPDIR` is the system's folder for temporary files (`/tmp` on Linux). Lists are "
        "JSON (`'[\"team\"]'`). Names are case-insensitive; a `.env` file in the working "
        "folder is read too.",
    ]
    return "\n".join(lines) + "\n"


def readme_block(readme: str) -> str:
    """What the README holds between its settings markers."""
    start = readme.index(README_START) + len(README_START)
    end = readme.index(README_END)
    return readme[start:end].strip("\n") + "\n"


# -- checking ------------------------------------------------------------------------------


def _dotenv() -> dict[str, str]:
    path = Path(".env")
    if not path.is_file():
        return {}
    return {k.upper(): v for k, v in dotenv_values(path).items() if v is not None}


def _environment() -> dict[str, str]:
    return {key.upper(): value for key, value in os.environ.items()}


def _field_of(cls: type[BaseSettings], loc: str) -> str | None:
    if loc in cls.model_fields:
        return loc
    for name in cls.model_fields:
        if loc.upper() in env_names(cls, name):
            return name
    return None


def _shown_input(cls: type[BaseSettings], name: str | None, value: object) -> str:
    if name is not None and _is_secret(cls.model_fields[name]):
        return MASK
    return SecretMasker()(repr(value))


def _is_secret(info: FieldInfo) -> bool:
    return "SecretStr" in repr(info.annotation)


def _validation_problems(cls: type[BaseSettings], exc: ValidationError) -> list[str]:
    problems: list[str] = []
    for error in exc.errors():
        loc = str(error["loc"][0]) if error["loc"] else ""
        name = _field_of(cls, loc)
        variable = env_name(cls, name) if name else (loc or cls.__name__)
        message = str(error["msg"]).removeprefix("Value error, ")
        if error.get("type") != "value_error":  # a validator's message already quotes it
            message += f" (got {_shown_input(cls, name, error.get('input'))})"
        problems.append(f"{variable}: {message}")
    return problems


@contextlib.contextmanager
def _without(variables: list[str]) -> Iterator[None]:
    saved = {key: os.environ.pop(key) for key in list(os.environ) if key.upper() in variables}
    try:
        yield
    finally:
        os.environ.update(saved)


def load_group(cls: type[BaseSettings]) -> tuple[BaseSettings | None, list[str]]:
    """The settings of one class, or None and one line per problem."""
    problems: list[str] = []
    unparsable: list[str] = []
    while True:
        try:
            with _without(unparsable):
                return cls(), problems
        except ValidationError as exc:
            return None, problems + _validation_problems(cls, exc)
        except SettingsError as exc:
            # A list setting that is not JSON stops the settings class at once: note it and
            # look again without it, so that every problem is reported in one go.
            match = re.search(r'field "(\w+)"', str(exc))
            name = match.group(1) if match else None
            variable = env_name(cls, name) if name in cls.model_fields else None
            if variable is None or variable in unparsable:
                return None, [*problems, f"{variable or cls.__name__}: {exc}"]
            unparsable.append(variable)
            problems.append(f'{variable}: not valid JSON; write a JSON list like ["a", "b"]')


def unknown_variables(variables: Mapping[str, str]) -> list[str]:
    known = known_variables()
    problems = []
    for variable in sorted(variables):
        if not variable.startswith(PREFIXES) or variable in known:
            continue
        close = difflib.get_close_matches(variable, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        problems.append(f"{variable}: not a setting, ignored{hint}")
    return problems


def check_all() -> tuple[list[tuple[SettingsGroup, BaseSettings]], list[str]]:
    loaded: list[tuple[SettingsGroup, BaseSettings]] = []
    problems: list[str] = []
    for group in GROUPS:
        settings, found = load_group(group.cls)
        problems += found
        if settings is not None:
            loaded.append((group, settings))
    problems += unknown_variables({**_dotenv(), **_environment()})
    return loaded, problems


# -- showing -------------------------------------------------------------------------------


def shown_value(value: object) -> str:
    """A setting's value for people: secrets masked, lists as JSON."""
    if isinstance(value, SecretStr):
        return MASK if value.get_secret_value() else '""'
    if value is None:
        return "unset"
    if isinstance(value, list | tuple):
        return json.dumps(list(value))
    if isinstance(value, bool):
        return str(value).lower()
    return SecretMasker()(str(value))


def source_of(cls: type[BaseSettings], name: str, env: Mapping[str, str]) -> str:
    names = env_names(cls, name)
    if any(variable in env for variable in names):
        return "environment"
    if any(variable in _dotenv() for variable in names):
        return ".env"
    return "default"


def settings_table(group: SettingsGroup, settings: BaseSettings) -> Table:
    table = Table(title=group.title, title_justify="left", show_lines=False)
    table.add_column("variable", style="bold")
    table.add_column("value", overflow="fold")
    table.add_column("from")
    env = _environment()
    for name in type(settings).model_fields:
        source = source_of(type(settings), name, env)
        table.add_row(
            env_name(type(settings), name),
            shown_value(getattr(settings, name)),
            source if source == "default" else f"[cyan]{source}[/cyan]",
        )
    return table


@click.command("config")
@click.option("--markdown", is_flag=True, help="Print the settings tables of the README and exit.")
def config_command(markdown: bool) -> None:
    """Show the effective settings (secrets masked) and check them; exit 2 if any is wrong."""
    if markdown:
        click.echo(settings_markdown(), nl=False)
        return
    loaded, problems = check_all()
    if problems:
        click.secho(f"{len(problems)} configuration problem(s):", fg="red", err=True)
        for problem in problems:
            click.echo(f"  {problem}", err=True)
        sys.exit(EXIT_INVALID)
    console = Console()
    for group, settings in loaded:
        console.print(settings_table(group, settings))
    console.print("[green]configuration OK[/green]")
