"""Every setting is documented in the README, and `trace-processor config` checks them all."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from processor.config_command import (
    EXIT_INVALID,
    GROUPS,
    config_command,
    env_name,
    readme_block,
    settings_markdown,
)

README = Path(__file__).resolve().parents[2] / "README.md"
OURS = ("PROCESSOR_", "STACK_", "KAFKA_", "MLFLOW_", "PHOENIX_")


@pytest.fixture(autouse=True)
def clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No setting from the developer's shell or .env file leaks into these tests."""
    for key in list(os.environ):
        if key.upper().startswith(OURS):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    yield


def test_readme_holds_exactly_the_generated_settings_tables() -> None:
    assert readme_block(README.read_text()) == settings_markdown(), (
        "README.md's settings tables are out of date: run `trace-processor config --markdown` "
        "and paste its output between <!-- settings:start --> and <!-- settings:end -->"
    )


def test_every_setting_is_described() -> None:
    for group in GROUPS:
        for name, info in group.cls.model_fields.items():
            assert info.description, f"{group.cls.__name__}.{name} has no description"


def test_markdown_lists_every_setting_by_its_variable() -> None:
    table = settings_markdown()
    for group in GROUPS:
        for name in group.cls.model_fields:
            assert f"| `{env_name(group.cls, name)}` |" in table
    assert "| `KAFKA_BOOTSTRAP_SERVERS` | `127.0.0.1:9092` |" in table
    assert "| `PROCESSOR_WINDOW_SIZE_MS` | `60000` |" in table


def test_markdown_command_prints_the_tables() -> None:
    result = CliRunner().invoke(config_command, ["--markdown"])
    assert result.exit_code == 0
    assert result.output == settings_markdown()


def test_config_shows_effective_values_with_secrets_masked() -> None:
    secret = "phx-secret-0123456789"
    env = {
        "PHOENIX_API_KEY": secret,
        "MLFLOW_TRACKING_URI": "https://bob:hunter2@mlflow.example.com",
        "PROCESSOR_WINDOW_SIZE_MS": "30000",
    }
    result = CliRunner().invoke(config_command, [], env=env, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert secret not in result.output
    assert "hunter2" not in result.output
    assert "********" in result.output
    assert "30000" in result.output
    assert "configuration OK" in result.output


def test_bad_configuration_gives_one_line_per_problem_and_exit_2() -> None:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": "no-port-here",
        "PROCESSOR_WINDOW_SIZE_MS": "500",
        "PROCESSOR_DIMENSION_ATTRIBUTES": "team,env",  # not JSON
        "PROCESSOR_WINDOW_SIZE": "60000",  # a typo the settings class would ignore
        "STACK_KAFKA_PORT": "99999",
        "PHOENIX_API_KEY": "phx-secret-0123456789",
    }
    result = CliRunner().invoke(config_command, [], env=env)
    assert result.exit_code == EXIT_INVALID
    problems = [line.strip() for line in result.output.splitlines()[1:]]
    assert result.output.splitlines()[0] == "5 configuration problem(s):"
    assert len(problems) == 5
    by_variable = {problem.split(":", 1)[0]: problem for problem in problems}
    assert set(by_variable) == {
        "KAFKA_BOOTSTRAP_SERVERS",
        "PROCESSOR_WINDOW_SIZE_MS",
        "PROCESSOR_DIMENSION_ATTRIBUTES",
        "PROCESSOR_WINDOW_SIZE",
        "STACK_KAFKA_PORT",
    }
    assert "127.0.0.1:9092" in by_variable["KAFKA_BOOTSTRAP_SERVERS"]
    assert "1000" in by_variable["PROCESSOR_WINDOW_SIZE_MS"]
    assert "JSON" in by_variable["PROCESSOR_DIMENSION_ATTRIBUTES"]
    assert "did you mean PROCESSOR_WINDOW_SIZE_MS" in by_variable["PROCESSOR_WINDOW_SIZE"]
    assert "phx-secret" not in result.output
