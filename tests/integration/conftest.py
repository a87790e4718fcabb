"""The real stack, once per test session: Kafka, Phoenix and MLflow as local processes.

The stack gets its own state folder and ports (3xxxx) so that a developer's `stack up` on the
default ports is left alone. Each test uses its own topics, consumer group, Phoenix project and
MLflow experiment, so tests do not see each other's data.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from processor.settings import StackSettings
from processor.stack import LocalStack, StackEndpoints

# support.py holds shared assertions: rewrite them as pytest does a test's, for their messages.
pytest.register_assert_rewrite("tests.integration.support")

_names = itertools.count()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackEndpoints]:
    state = tmp_path_factory.mktemp("stack")
    settings = StackSettings(
        dir=state,
        kafka_port=int(os.environ.get("TEST_KAFKA_PORT", "39092")),
        kafka_controller_port=int(os.environ.get("TEST_KAFKA_CONTROLLER_PORT", "39093")),
        phoenix_port=int(os.environ.get("TEST_PHOENIX_PORT", "36006")),
        phoenix_grpc_port=int(os.environ.get("TEST_PHOENIX_GRPC_PORT", "34317")),
        mlflow_port=int(os.environ.get("TEST_MLFLOW_PORT", "35000")),
    )
    local = LocalStack(settings)
    try:
        yield local.up()
    finally:
        local.down()


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A short name for this test's topics, group, project and experiment."""
    base = "".join(ch if ch.isalnum() else "-" for ch in request.node.name)[:40].strip("-")
    return f"t{next(_names)}-{base}-{os.getpid()}"


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    return tmp_path
