"""How the worker's topics are replicated, and that a worker takes a list of brokers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from faust.transport.drivers.aiokafka import server_list

from processor.errors import ConfigurationError
from processor.replication import min_insync_for, replication_for
from processor.settings import WorkerSettings, load_worker_settings
from processor.worker.topics import Replication

OURS = ("PROCESSOR_", "KAFKA_", "MLFLOW_", "PHOENIX_")


@pytest.fixture(autouse=True)
def clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No setting from the developer's shell or .env file leaks into these tests."""
    for key in list(os.environ):
        if key.upper().startswith(OURS):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    yield


@pytest.mark.parametrize(
    ("brokers", "factor", "min_insync"), [(1, 1, 1), (2, 2, 1), (3, 3, 2), (5, 3, 2)]
)
def test_topics_get_three_replicas_two_in_sync_where_the_cluster_allows(
    brokers: int, factor: int, min_insync: int
) -> None:
    assert (replication_for(brokers), min_insync_for(replication_for(brokers))) == (
        factor,
        min_insync,
    )
    assert Replication.resolve(WorkerSettings(), brokers) == Replication(factor, min_insync)


def test_set_replication_wins_over_the_cluster_size() -> None:
    settings = WorkerSettings(replication_factor=2, min_insync_replicas=2)

    assert Replication.resolve(settings, brokers=3) == Replication(factor=2, min_insync=2)
    assert Replication.resolve(WorkerSettings(min_insync_replicas=1), 3) == Replication(3, 1)


def test_more_replicas_than_brokers_stop_start_up_saying_so() -> None:
    with pytest.raises(ConfigurationError, match=r"PROCESSOR_REPLICATION_FACTOR=3 .* 1 broker"):
        Replication.resolve(WorkerSettings(replication_factor=3), brokers=1)


def test_more_in_sync_replicas_than_the_cluster_holds_stop_start_up() -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"PROCESSOR_MIN_INSYNC_REPLICAS=2 exceeds the replication factor 1",
    ):
        Replication.resolve(WorkerSettings(min_insync_replicas=2), brokers=1)


def test_more_in_sync_replicas_than_replicas_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_worker_settings(replication_factor=2, min_insync_replicas=3)

    message = str(caught.value)
    assert "min_insync_replicas" in message
    assert "PROCESSOR_REPLICATION_FACTOR=2" in message and "every write would be refused" in message


def test_the_worker_connects_to_every_broker_of_the_list(tmp_path: Path) -> None:
    from processor.worker.app import create_app

    brokers = "127.0.0.1:31292, 127.0.0.1:31294,127.0.0.1:31296"
    settings = load_worker_settings(kafka_bootstrap_servers=brokers, data_dir=tmp_path / "faust")

    app = create_app(settings)

    expected = ["127.0.0.1:31292", "127.0.0.1:31294", "127.0.0.1:31296"]
    # What faust hands aiokafka's consumer and producer as bootstrap_servers.
    assert server_list(app.transport.url, 9092) == expected
    assert server_list(app.producer.transport.url, 9092) == expected
