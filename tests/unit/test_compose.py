"""The Docker deployment files, checked without a Docker engine.

- ``docker-compose.yml``, ``docker-compose.dev.yml`` and their merge are valid Compose files,
  judged twice: by a Compose CLI (``docker compose`` v2 if present, else Debian's
  ``docker-compose`` v1: ``apt-get install -y docker-compose``), which parses, merges and
  interpolates them as a user's would; and by the Compose Specification JSON schema in
  ``tests/compose-spec.json``, which also judges the development file on its own.
- The worker's environment holds only names that ``processor.settings.WorkerSettings`` reads,
  derived from the class, and values that it accepts.
- The worker scales (``docker compose up --scale worker=N``), waits for healthy services, and
  every image is pinned.
- The Dockerfile copies what exists and is not ``.dockerignore``d, and starts the worker as a
  non-root user.

``tests/compose-spec.json`` is the compose-spec project's schema (Apache-2.0), copied unchanged
from the check-jsonschema package on PyPI (0.39.0, file
``check_jsonschema/builtin_schemas/vendor/compose-spec.json``, sha256
d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64). To
refresh it: ``pip download --no-deps check-jsonschema`` and unzip that file over it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "docker-compose.yml"
DEV = REPO / "docker-compose.dev.yml"
SCHEMA = REPO / "tests" / "compose-spec.json"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

COMPOSE_CLI_INSTALL = (
    "install a Compose CLI: `apt-get install -y docker-compose` (Debian/Ubuntu, Compose v1), "
    "or Docker's compose plugin (`docker compose`)"
)
PYTHON_DEPS_INSTALL = "pip install pyyaml jsonschema (or: pip install -e '.[test]')"

# The services the worker cannot work without (DESIGN.md, "Real services").
# What each processor service writes to: it must not start before those are healthy. The
# workers do not wait for Phoenix: only the forwarder talks to it.
NEEDS = {"worker": {"kafka", "mlflow"}, "forwarder": {"kafka", "phoenix"}}


# ---------------------------------------------------------------------------------------------
# Loading, interpolation, merging
# ---------------------------------------------------------------------------------------------


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:  # pragma: no cover - depends on the environment
        pytest.fail(f"PyYAML is needed to read the compose files: {PYTHON_DEPS_INSTALL}")
    return yaml


def load(path: Path) -> dict[str, Any]:
    assert path.is_file(), f"{path.name} is missing"
    data = _yaml().safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name} is not a YAML mapping"
    return data


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: str) -> str:
    """Compose interpolation with every variable unset: what a fresh checkout gets."""

    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        expression = match.group("braced")
        if expression is None:
            return ""  # $NAME, unset
        for separator in (":-", "-"):
            if separator in expression:
                return expression.split(separator, 1)[1]
        for separator in (":?", "?"):
            if separator in expression:
                name = expression.split(separator, 1)[0]
                pytest.fail(f"${{{expression}}}: {name} is required, the files must run without it")
        return ""

    return _VARIABLE.sub(substitute, value)


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's `environment` as a mapping (Compose allows a list of NAME=value too)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in env)
        return {name: value for name, value in pairs}
    return {name: None if value is None else str(value) for name, value in env.items()}


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A service's `depends_on` in the long form (the short list means service_started)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    return {name: dict(spec or {}) for name, spec in deps.items()}


def _volume_target(volume: Any) -> str:
    if isinstance(volume, dict):
        return str(volume.get("target"))
    parts = str(volume).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def _merge(base: Any, override: Any, key: str = "") -> Any:
    """Compose's override merge, as far as these files need it (the CLI checks the rest)."""
    if key == "environment":
        return {**environment({key: base}), **environment({key: override})}
    if key == "depends_on":
        return {**depends_on({key: base}), **depends_on({key: override})}
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for name, value in override.items():
            merged[name] = _merge(base[name], value, name) if name in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        if key in {"command", "entrypoint", "test"}:
            return override
        if key == "volumes":
            targets = {_volume_target(volume) for volume in override}
            return [v for v in base if _volume_target(v) not in targets] + override
        return base + [item for item in override if item not in base]
    return override


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return load(BASE)


@pytest.fixture(scope="module")
def dev() -> dict[str, Any]:
    return load(DEV)


@pytest.fixture(scope="module")
def merged(base: dict[str, Any], dev: dict[str, Any]) -> dict[str, Any]:
    return _merge(base, dev)


def services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = config.get("services")
    assert isinstance(found, dict) and found, "no services"
    return found


# ---------------------------------------------------------------------------------------------
# Validity: a Compose CLI, and the Compose Specification schema
# ---------------------------------------------------------------------------------------------


def _compose_cli() -> list[str]:
    """`docker compose` (v2) when the docker CLI has the plugin, else `docker-compose`."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=60
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    pytest.fail(f"no Compose CLI on PATH to validate the compose files with; {COMPOSE_CLI_INSTALL}")


def _run_config(*files: Path) -> dict[str, Any]:
    command = [*_compose_cli()]
    for path in files:
        command += ["-f", str(path)]
    command.append("config")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    shown = shlex.join(command)
    assert result.returncode == 0, f"`{shown}` rejected the files:\n{result.stderr}"
    warnings = [line for line in result.stderr.splitlines() if "warn" in line.lower()]
    assert not warnings, f"`{shown}` warned:\n" + "\n".join(warnings)
    rendered = _yaml().safe_load(result.stdout)
    assert isinstance(rendered, dict), f"`{shown}` printed no configuration"
    return rendered


def test_compose_cli_accepts_the_deployment_file(base: dict[str, Any]) -> None:
    rendered = _run_config(BASE)
    assert set(services(rendered)) == set(services(base))


def test_compose_cli_accepts_the_files_merged(merged: dict[str, Any]) -> None:
    rendered = _run_config(BASE, DEV)
    # The CLI's merge and the one the other tests inspect agree where it matters.
    assert set(services(rendered)) == set(services(merged))
    for name, service in services(merged).items():
        real = services(rendered)[name]
        assert set(environment(real)) == set(environment(service)), name
        assert bool(real.get("ports")) == bool(service.get("ports")), name


def _schema_validator() -> Any:
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - depends on the environment
        pytest.fail(f"jsonschema is needed to check the compose files: {PYTHON_DEPS_INSTALL}")
    assert SCHEMA.is_file(), f"{SCHEMA} is missing; see this module's docstring to restore it"
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize("which", ["docker-compose.yml", "docker-compose.dev.yml", "merged"])
def test_files_match_the_compose_specification(
    which: str, base: dict[str, Any], dev: dict[str, Any], merged: dict[str, Any]
) -> None:
    config = {"docker-compose.yml": base, "docker-compose.dev.yml": dev, "merged": merged}[which]
    errors = sorted(_schema_validator().iter_errors(config), key=lambda e: list(e.absolute_path))
    assert not errors, f"{which} breaks the Compose Specification:\n" + "\n".join(
        f"  {'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for error in errors
    )


def test_the_schema_check_can_fail(base: dict[str, Any]) -> None:
    """Guards against a schema that accepts anything (e.g. a truncated or emptied copy)."""
    broken = json.loads(json.dumps(base))
    broken["services"]["worker"]["enviroment"] = {"TYPO": "1"}
    assert list(_schema_validator().iter_errors(broken))


# ---------------------------------------------------------------------------------------------
# The worker's environment
# ---------------------------------------------------------------------------------------------


def _worker_settings() -> Any:
    """processor.settings.WorkerSettings, from the checkout when the project is not installed."""
    try:
        from processor import settings
    except ModuleNotFoundError as exc:
        if exc.name != "processor":
            raise
        sys.path.insert(0, str(REPO))
        from processor import settings
    return settings.WorkerSettings


def worker_env_names() -> dict[str, str]:
    """Every environment variable WorkerSettings reads, upper-cased, mapped to its field."""
    from pydantic import AliasChoices, AliasPath

    settings_class = _worker_settings()
    prefix = str(settings_class.model_config.get("env_prefix") or "")
    names: dict[str, str] = {}
    for field_name, field in settings_class.model_fields.items():
        names[f"{prefix}{field_name}".upper()] = field_name
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        for choice in choices:
            if isinstance(choice, str):
                names[choice.upper()] = field_name
            elif isinstance(choice, AliasPath) and isinstance(choice.path[0], str):
                names[choice.path[0].upper()] = field_name
        if field.alias:
            names[field.alias.upper()] = field_name
    return names


def test_settings_expose_the_names_the_compose_files_rely_on() -> None:
    names = worker_env_names()
    for name in (
        "KAFKA_BOOTSTRAP_SERVERS",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_NAME",
        "PHOENIX_COLLECTOR_ENDPOINT",
        "PHOENIX_API_KEY",
    ):
        assert name in names, f"WorkerSettings no longer reads {name}"


@pytest.mark.parametrize("service", ["worker", "forwarder"])
@pytest.mark.parametrize("which", ["docker-compose.yml", "docker-compose.dev.yml", "merged"])
def test_worker_environment_names_are_read_by_the_worker(
    which: str, service: str, base: dict[str, Any], dev: dict[str, Any], merged: dict[str, Any]
) -> None:
    config = {"docker-compose.yml": base, "docker-compose.dev.yml": dev, "merged": merged}[which]
    worker = services(config).get(service)
    assert worker is not None, f"{which} has no {service} service"
    accepted = worker_env_names()
    unknown = sorted(name for name in environment(worker) if name.upper() not in accepted)
    assert not unknown, (
        f"{which}: the {service}'s environment sets {unknown}, which processor.settings."
        f"WorkerSettings does not read; it reads {sorted(accepted)}"
    )


def _env_of(merged: dict[str, Any], service: str) -> dict[str, str]:
    return {
        name: interpolate(value or "")
        for name, value in environment(merged["services"][service]).items()
    }


def test_worker_environment_is_wired_to_the_other_services(merged: dict[str, Any]) -> None:
    worker, forwarder = _env_of(merged, "worker"), _env_of(merged, "forwarder")
    # The workers aggregate and finalize (MLflow); the forwarder alone talks to Phoenix.
    assert worker["KAFKA_BOOTSTRAP_SERVERS"] == forwarder["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["MLFLOW_EXPERIMENT_NAME"]
    assert json.loads(worker["PROCESSOR_ROLES"]) == ["aggregate", "finalize"]
    assert json.loads(forwarder["PROCESSOR_ROLES"]) == ["forward"]
    assert forwarder["PHOENIX_COLLECTOR_ENDPOINT"] == "http://phoenix:6006"
    assert "PHOENIX_API_KEY" in forwarder
    # The links from MLflow to the traces need Phoenix's address on the workers too.
    assert worker["PHOENIX_COLLECTOR_ENDPOINT"] == "http://phoenix:6006"


@pytest.mark.parametrize("which", ["docker-compose.yml", "merged"])
def test_worker_settings_accept_the_worker_environment(
    which: str,
    base: dict[str, Any],
    merged: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The values validate too: a `PROCESSOR_WINDOW_SIZE_MS: 1m` would fail here, not at start."""
    settings_class = _worker_settings()
    config = {"docker-compose.yml": base, "merged": merged}[which]
    for name in list(os.environ):
        if name.upper() in worker_env_names():
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env file
    for name, value in environment(services(config)["worker"]).items():
        monkeypatch.setenv(name, interpolate(value or ""))
    settings_class(_env_file=None)


# ---------------------------------------------------------------------------------------------
# Scaling, health, pinning
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["docker-compose.yml", "docker-compose.dev.yml", "merged"])
def test_worker_can_be_scaled(
    which: str, base: dict[str, Any], dev: dict[str, Any], merged: dict[str, Any]
) -> None:
    config = {"docker-compose.yml": base, "docker-compose.dev.yml": dev, "merged": merged}[which]
    worker = services(config)["worker"]
    assert "container_name" not in worker, f"{which}: a fixed container_name stops --scale"
    assert not worker.get("ports"), f"{which}: host port bindings on the worker stop --scale"
    assert worker.get("network_mode") != "host", f"{which}: host networking makes workers clash"


def test_worker_is_built_from_this_repository(base: dict[str, Any]) -> None:
    build = services(base)["worker"].get("build")
    context = build if isinstance(build, str) else (build or {}).get("context")
    assert context in {".", "./"}, "the worker image is built from the repository's Dockerfile"
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (REPO / dockerfile).is_file()


def _healthcheck_enabled(service: dict[str, Any]) -> bool:
    check = service.get("healthcheck") or {}
    test = check.get("test")
    if check.get("disable") or not test:
        return False
    return not (isinstance(test, list) and test[:1] == ["NONE"])


@pytest.mark.parametrize("service", sorted(NEEDS))
def test_worker_waits_for_healthy_services(merged: dict[str, Any], service: str) -> None:
    all_services = services(merged)
    deps = depends_on(all_services[service])
    missing = NEEDS[service] - set(deps)
    assert not missing, f"the {service} does not wait for {sorted(missing)}"
    for name, spec in deps.items():
        assert spec.get("condition") == "service_healthy", (
            f"the {service} starts before {name} is healthy (condition: {spec.get('condition')})"
        )
        assert _healthcheck_enabled(all_services[name]), f"{name} has no healthcheck"


def test_every_awaited_service_has_a_healthcheck(merged: dict[str, Any]) -> None:
    all_services = services(merged)
    for name, service in all_services.items():
        for dependency, spec in depends_on(service).items():
            assert dependency in all_services, f"{name} depends on unknown {dependency}"
            if spec.get("condition") == "service_healthy":
                assert _healthcheck_enabled(all_services[dependency]), (
                    f"{name} waits for {dependency} to be healthy, but it has no healthcheck"
                )


def _assert_pinned(reference: str, where: str) -> None:
    if "@sha256:" in reference:
        return
    name, _, tag = reference.rpartition(":")
    assert name and "/" not in tag, f"{where}: image {reference!r} has no tag (means latest)"
    assert tag != "latest" and re.search(r"\d", tag), f"{where}: image {reference!r} is not pinned"


def test_images_are_pinned(merged: dict[str, Any]) -> None:
    for name, service in services(merged).items():
        image = service.get("image")
        if image is None:
            assert service.get("build"), f"{name} has neither an image nor a build"
            continue
        _assert_pinned(interpolate(str(image)), name)


def test_dockerfile_base_images_are_pinned() -> None:
    for line in _dockerfile_instructions():
        if line[0] == "FROM":
            image = next(word for word in line[1:] if not word.startswith("--"))
            _assert_pinned(image, "Dockerfile")


def test_dev_file_publishes_the_uis_and_kafka_for_host_clients(merged: dict[str, Any]) -> None:
    all_services = services(merged)

    def published(name: str) -> set[str]:
        """Host ports of a service ("127.0.0.1:6006:6006", "6006:6006" or the long form)."""
        found = set()
        for port in all_services[name].get("ports") or []:
            if isinstance(port, dict):
                found.add(str(port.get("published")))
            elif str(port).count(":") >= 1:
                found.add(str(port).split("/")[0].split(":")[-2])
        return found

    assert {"6006", "4317"} <= published("phoenix")
    assert "5000" in published("mlflow")
    (kafka_host_port,) = published("kafka")
    advertised = environment(all_services["kafka"])["KAFKA_ADVERTISED_LISTENERS"] or ""
    assert f":{kafka_host_port}" in advertised, (
        "Kafka must advertise the published port, or host clients are sent an address they "
        "cannot reach"
    )
    assert "PLAINTEXT://kafka:9092" in advertised, "containers keep using kafka:9092"
    worker_mounts = [str(v) for v in all_services["worker"].get("volumes") or []]
    assert any(v.startswith("./processor:/app/processor") for v in worker_mounts)
    loadgen = all_services["loadgen"]
    assert loadgen["command"][0] == "loadgen"
    assert "kafka:9092" in loadgen["command"]


# ---------------------------------------------------------------------------------------------
# The Dockerfile
# ---------------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[list[str]]:
    """(INSTRUCTION, args...) per instruction, continuation lines joined, comments dropped."""
    assert DOCKERFILE.is_file(), "Dockerfile is missing"
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        rest = rest.strip()
        args = json.loads(rest) if rest.startswith("[") else shlex.split(rest, comments=True)
        instructions.append([keyword.upper(), *args])
    return instructions


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rules, enough for plain patterns, `**/` and `!` exceptions."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        for candidate in candidates:
            hit = fnmatch.fnmatch(candidate, pattern)
            if pattern.startswith("**/"):
                hit = hit or fnmatch.fnmatch(candidate.rsplit("/", 1)[-1], pattern[3:])
            if hit:
                ignored = not negate
                break
    return ignored


def _dockerignore_patterns() -> list[str]:
    assert DOCKERIGNORE.is_file(), ".dockerignore is missing"
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_dockerfile_copies_what_the_build_context_has() -> None:
    patterns = _dockerignore_patterns()
    copied = 0
    for instruction in _dockerfile_instructions():
        if instruction[0] not in {"COPY", "ADD"}:
            continue
        sources = [word for word in instruction[1:-1] if not word.startswith("--")]
        for source in sources:
            if any(ch in source for ch in "*?["):
                continue  # a wildcard may match nothing
            assert (REPO / source).exists(), f"the Dockerfile copies {source}, which is missing"
            assert not _dockerignored(source, patterns), f".dockerignore excludes {source}"
            copied += 1
    assert copied, "the Dockerfile copies nothing from the repository"


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    patterns = _dockerignore_patterns()
    for path in (".env", ".git", ".venv", ".stack"):
        assert _dockerignored(path, patterns), f".dockerignore lets {path} into the build"
    assert not _dockerignored("processor/settings.py", patterns)


def test_dockerfile_runs_the_worker_as_a_non_root_user() -> None:
    instructions = _dockerfile_instructions()
    last = {instruction[0]: instruction[1:] for instruction in instructions}
    assert instructions[0][0] == "FROM" and instructions[0][1].startswith("python:3.11-slim")
    assert last["ENTRYPOINT"] == ["trace-processor"]
    assert last["CMD"] == ["worker"]
    user = last.get("USER", ["root"])[0].split(":")[0]
    assert user not in {"root", "0"}, "the image runs as root"
    runs = [" ".join(instruction[1:]) for instruction in instructions if instruction[0] == "RUN"]
    assert any(re.search(r"\bpip install\b[^&;|]*\s\.(\s|$)", run) for run in runs), (
        "the image does not `pip install .` the project"
    )
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^trace-processor\s*=\s*"processor\.cli:main"', pyproject, re.M), (
        "the image's entrypoint `trace-processor` is no longer a console script of the project"
    )
