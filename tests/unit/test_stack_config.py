"""The local stack's pure parts and its process handling, without Kafka, Phoenix or MLflow."""

from __future__ import annotations

import base64
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from processor.errors import ConfigurationError, StackError
from processor.settings import StackSettings, load_stack_settings
from processor.stack import LocalStack
from processor.stack.kafka import new_cluster_id, server_properties, shared_cluster_id
from processor.stack.kafka_jars import KAFKA_POM, kafka_version
from processor.stack.kafka_leaders import busiest_leader
from processor.stack.kafka_nodes import kafka_nodes, node_id_of
from processor.stack.layout import StackLayout, parse_service_names
from processor.stack.ports import port_is_free
from processor.stack.process import group_is_alive
from processor.stack.service import LaunchSpec
from processor.stack.service_process import ServiceProcess


def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and line[0] != "#")


def test_kafka_runs_as_one_kraft_node_on_loopback(tmp_path: Path) -> None:
    nodes = kafka_nodes(StackSettings(kafka_port=29092, kafka_controller_port=29093))
    (node,) = nodes
    props = _properties(server_properties(node, nodes, tmp_path))

    # The names a single node always had: an existing state folder stays valid.
    assert node.process_name == "kafka" and node.node_id == 1
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == f"{props['node.id']}@127.0.0.1:29093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:29092,CONTROLLER://127.0.0.1:29093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:29092"
    assert props["log.dirs"] == str(tmp_path)
    # With one broker any replication factor above 1 leaves internal topics unavailable.
    for key, value in props.items():
        if key.endswith((".replication.factor", ".min.isr")):
            assert value == "1", key


def test_a_cluster_is_three_voters_each_on_its_own_ports(tmp_path: Path) -> None:
    nodes = kafka_nodes(
        StackSettings(kafka_port=29092, kafka_controller_port=29093, kafka_brokers=3)
    )

    assert [(n.node_id, n.port, n.controller_port, n.process_name) for n in nodes] == [
        (1, 29092, 29093, "kafka-1"),
        (2, 29094, 29095, "kafka-2"),
        (3, 29096, 29097, "kafka-3"),
    ]
    for node in nodes:
        props = _properties(server_properties(node, nodes, tmp_path / node.process_name))
        assert props["node.id"] == str(node.node_id)
        assert props["process.roles"] == "broker,controller"
        assert props["controller.quorum.voters"] == (
            "1@127.0.0.1:29093,2@127.0.0.1:29095,3@127.0.0.1:29097"
        )
        assert props["listeners"] == (
            f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}"
        )
        assert props["advertised.listeners"] == f"PLAINTEXT://127.0.0.1:{node.port}"
        assert props["log.dirs"] == str(tmp_path / node.process_name)
        # The loss of one broker loses no acknowledged write and stops none.
        for key, value in props.items():
            if key.endswith(".replication.factor"):
                assert value == "3", key
            if key.endswith((".min.isr", "min.insync.replicas")):
                assert value == "2", key


@pytest.mark.parametrize(
    ("brokers", "replication", "min_insync"), [(1, "1", "1"), (2, "2", "1"), (5, "3", "2")]
)
def test_internal_topics_are_as_replicated_as_the_nodes_allow(
    tmp_path: Path, brokers: int, replication: str, min_insync: str
) -> None:
    nodes = kafka_nodes(StackSettings(kafka_brokers=brokers))
    props = _properties(server_properties(nodes[0], nodes, tmp_path))

    assert props["offsets.topic.replication.factor"] == replication
    assert props["default.replication.factor"] == replication
    assert props["min.insync.replicas"] == min_insync
    assert props["transaction.state.log.min.isr"] == min_insync


def test_the_stack_size_is_checked_with_the_variable_named() -> None:
    assert load_stack_settings(kafka_brokers=3).kafka_brokers == 3
    for brokers in (0, 6):
        with pytest.raises(ConfigurationError, match="kafka_brokers"):
            load_stack_settings(kafka_brokers=brokers)


def test_endpoints_name_every_broker(tmp_path: Path) -> None:
    settings = StackSettings(
        dir=tmp_path, kafka_port=25092, kafka_controller_port=25093, kafka_brokers=3
    )
    endpoints = LocalStack(settings).endpoints

    assert endpoints.kafka_bootstrap == "127.0.0.1:25092,127.0.0.1:25094,127.0.0.1:25096"
    assert [node.address for node in endpoints.kafka_nodes] == endpoints.kafka_bootstrap.split(",")
    single = LocalStack(StackSettings(dir=tmp_path, kafka_port=25092)).endpoints
    assert single.kafka_bootstrap == "127.0.0.1:25092"


def test_a_later_nodes_port_clash_names_how_it_is_set(tmp_path: Path) -> None:
    settings = StackSettings(
        dir=tmp_path,
        kafka_port=25092,
        kafka_controller_port=25093,
        kafka_brokers=3,
        phoenix_port=25094,
    )

    with pytest.raises(
        StackError, match=r"STACK_KAFKA_PORT \+ 2 and STACK_PHOENIX_PORT are both 25094"
    ):
        LocalStack(settings)


@pytest.mark.parametrize(
    ("name", "node_id"), [("kafka", 1), ("kafka-1", 1), ("kafka-3", 3), ("phoenix", None)]
)
def test_kafka_process_names_say_the_node(name: str, node_id: int | None) -> None:
    assert node_id_of(name) == node_id


def test_the_nodes_of_a_cluster_share_one_cluster_id(tmp_path: Path) -> None:
    path = tmp_path / "kafka-cluster.id"
    found: list[str] = []
    # As the nodes prepare: in parallel, each asking for the id before any exists.
    threads = [
        threading.Thread(target=lambda: found.append(shared_cluster_id(path))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(set(found)) == 1 and len(found) == 8
    assert path.read_text().strip() == found[0]
    assert shared_cluster_id(path) == found[0]  # kept for the next start
    assert [entry.name for entry in tmp_path.iterdir()] == ["kafka-cluster.id"]


def test_the_busiest_leader_leads_the_most_partitions() -> None:
    assert busiest_leader({0: 2, 1: 3, 2: 2, 3: 1}) == 2
    assert busiest_leader({0: 3, 1: 1, 2: 3, 3: 1}) == 1  # a tie: the lowest id
    assert busiest_leader({0: -1, 1: -1, 2: 3}) == 3  # partitions without a leader do not count
    with pytest.raises(StackError, match="no partition has a leader"):
        busiest_leader({0: -1})


def test_cluster_ids_look_like_kafkas_own() -> None:
    ids = {new_cluster_id() for _ in range(200)}

    assert len(ids) == 200
    for cluster_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cluster_id)
        assert not cluster_id.startswith("-")  # the storage tool would take it for an option
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_kafka_version_comes_from_the_pom() -> None:
    version = kafka_version()

    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    assert f"<kafka.version>{version}</kafka.version>" in KAFKA_POM.read_text()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["mlflow", "kafka"], ("kafka", "mlflow")),
        (["phoenix", "phoenix"], ("phoenix",)),
        ([], ()),
    ],
)
def test_service_names_keep_the_stack_order(given: list[str], expected: tuple[str, ...]) -> None:
    assert parse_service_names(given) == expected


def test_unknown_service_name_is_refused_with_the_choices() -> None:
    with pytest.raises(
        StackError, match="unknown service redis; choose from kafka, phoenix, mlflow"
    ):
        parse_service_names(["kafka", "redis"])


def test_two_services_on_one_port_are_refused(tmp_path: Path) -> None:
    settings = StackSettings(dir=tmp_path, phoenix_port=25000, mlflow_port=25000)

    with pytest.raises(StackError, match="STACK_PHOENIX_PORT and STACK_MLFLOW_PORT are both 25000"):
        LocalStack(settings)


def test_a_listening_port_is_not_free() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not port_is_free(port)
    assert port_is_free(port)


@pytest.fixture
def process(tmp_path: Path) -> Iterator[ServiceProcess]:
    service_process = ServiceProcess("kafka", StackLayout.at(tmp_path))
    yield service_process
    service_process.stop(grace_s=5)


def _python(code: str, cwd: Path) -> LaunchSpec:
    return LaunchSpec(command=[sys.executable, "-c", code], cwd=cwd)


def _wait_for_exit(process: ServiceProcess) -> int:
    deadline = time.monotonic() + 30
    while (code := process.exit_code()) is None:
        assert time.monotonic() < deadline, "the test process did not exit"
        time.sleep(0.05)
    return code


def test_a_started_process_is_recorded_and_recognised(
    process: ServiceProcess, tmp_path: Path
) -> None:
    pid = process.spawn(_python("import time; time.sleep(60)", tmp_path), ports=[1])

    assert process.pid_path.read_text().strip() == str(pid)
    assert process.running_pid() == pid
    assert process.running_ports(pid) == (1,)
    assert os.getpgid(pid) == pid  # its own group, so `down` can stop all it forks


def test_a_pid_file_naming_someone_elses_process_is_not_trusted(
    process: ServiceProcess,
) -> None:
    process.pid_path.parent.mkdir(parents=True)
    process.pid_path.write_text(f"{os.getpid()}\n")  # alive, but not a stack service

    assert process.running_pid() is None
    assert process.stop(grace_s=1) is None
    assert not process.pid_path.exists()


def test_the_log_tail_shows_only_the_latest_run(process: ServiceProcess, tmp_path: Path) -> None:
    process.spawn(_python("print('first run')", tmp_path), ports=[])
    _wait_for_exit(process)
    process.spawn(_python("print('second run'); raise SystemExit(3)", tmp_path), ports=[])

    assert _wait_for_exit(process) == 3
    assert process.log_tail() == ["second run"]
    assert "first run" in process.log_path.read_text()  # appended, not overwritten


def test_stop_ends_the_whole_process_group(process: ServiceProcess, tmp_path: Path) -> None:
    forks_a_worker = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "time.sleep(60)\n"
    )
    pid = process.spawn(_python(forks_a_worker, tmp_path), ports=[])
    time.sleep(0.5)

    assert process.stop(grace_s=5) == pid
    assert not group_is_alive(pid)
    assert not process.pid_path.exists()
    assert process.stop(grace_s=5) is None  # stopping twice is harmless


def _sleeper(cwd: Path) -> LaunchSpec:
    return _python("import time; time.sleep(60)", cwd)


def test_a_killed_process_leaves_its_pid_file_as_a_crash_would(
    process: ServiceProcess, tmp_path: Path
) -> None:
    pid = process.spawn(_sleeper(tmp_path), ports=[])

    assert process.kill() == pid
    assert not group_is_alive(pid)
    assert process.running_pid() is None
    assert process.pid_path.exists()  # what a crash leaves behind; the next start cleans it up
    assert process.clean_up_after_crash(grace_s=1)
    assert not process.pid_path.exists()
    with pytest.raises(StackError, match="kafka is not running"):
        process.kill()


def test_kafka_nodes_of_another_size_are_listed_refused_and_stopped(tmp_path: Path) -> None:
    """A cluster left running by `up --brokers 3`: a one-node `up` refuses to start beside it,
    `status` shows it, `down` stops it."""
    stack = LocalStack(StackSettings(dir=tmp_path, kafka_port=25092, kafka_controller_port=25093))
    node = ServiceProcess("kafka-2", stack.layout)  # a stand-in for the node's JVM
    pid = node.spawn(_sleeper(tmp_path), ports=[25094, 25095])
    try:
        status = stack.status()["kafka-2"]
        assert status.running and status.pid == pid and status.url == "127.0.0.1:25094"
        assert not status.healthy
        with pytest.raises(StackError, match=r"running as kafka-2 \(pid \d+\).*; run `"):
            stack.up(["kafka"])

        stack.down(["kafka"])

        assert not group_is_alive(pid)
        assert "kafka-2" not in stack.status()
    finally:
        node.stop(grace_s=5)


def test_kill_broker_names_the_nodes_there_are(tmp_path: Path) -> None:
    stack = LocalStack(StackSettings(dir=tmp_path, kafka_brokers=3))

    with pytest.raises(StackError, match="no Kafka node 4: this stack has nodes 1, 2, 3"):
        stack.kill_broker(4)
    with pytest.raises(StackError, match="kafka-2 is not running"):
        stack.kill_broker(2)
