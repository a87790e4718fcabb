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


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A Kafka cluster of three nodes (`stack up --brokers 3`) for the session, which tests may
    kill and restart nodes of; Phoenix and MLflow are the ``stack`` fixture's.

    Its ports (TEST_KAFKA_CLUSTER_BASE_PORT and the five above it) lie below Linux's ephemeral
    range (32768-60999): a client retrying to connect to a killed node's port in that range can
    be given that very port as its own source port, connect to itself, and keep the restarted
    node from binding it.
    """
    base = int(os.environ.get("TEST_KAFKA_CLUSTER_BASE_PORT", "29292"))
    yield from _kafka_only(tmp_path_factory.mktemp("kafka-cluster"), base, brokers=3)


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A short name for this test's topics, group, project and experiment."""
    base = "".join(ch if ch.isalnum() else "-" for ch in request.node.name)[:40].strip("-")
    return f"t{next(_names)}-{base}-{os.getpid()}"


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def lone_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A single-node Kafka of the test's own, started; the test may kill and restart it.

    Its ports (TEST_KAFKA_LONE_PORT and the one above) lie below Linux's ephemeral range, for
    the reason ``kafka_cluster`` gives."""
    port = int(os.environ.get("TEST_KAFKA_LONE_PORT", "29392"))
    yield from _kafka_only(tmp_path_factory.mktemp("lone-broker"), port, brokers=1)


def _kafka_only(state: Path, port: int, *, brokers: int) -> Iterator[LocalStack]:
    """Kafka alone (``brokers`` nodes from ``port`` up), started, and stopped afterwards."""
    settings = StackSettings(
        dir=state,
        kafka_brokers=brokers,
        kafka_port=port,
        kafka_controller_port=port + 1,
        # Not started; set so that nothing defaults to another stack's ports.
        phoenix_port=port + 10,
        phoenix_grpc_port=port + 11,
        mlflow_port=port + 12,
        start_timeout_s=300,
    )
    local = LocalStack(settings)
    try:
        local.up(("kafka",))
        yield local
    finally:
        local.down(("kafka",))
