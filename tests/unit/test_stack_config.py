"""The local stack's pure parts and its process handling, without Kafka, Phoenix or MLflow."""

from __future__ import annotations

import base64
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from processor.errors import StackError
from processor.settings import StackSettings
from processor.stack import LocalStack
from processor.stack.kafka import new_cluster_id, server_properties
from processor.stack.kafka_jars import KAFKA_POM, kafka_version
from processor.stack.layout import StackLayout, parse_service_names
from processor.stack.ports import port_is_free
from processor.stack.process import group_is_alive
from processor.stack.service import LaunchSpec
from processor.stack.service_process import ServiceProcess


def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and line[0] != "#")


def test_kafka_runs_as_one_kraft_node_on_loopback(tmp_path: Path) -> None:
    props = _properties(server_properties(port=29092, controller_port=29093, data_dir=tmp_path))

    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == f"{props['node.id']}@127.0.0.1:29093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:29092,CONTROLLER://127.0.0.1:29093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:29092"
    assert props["log.dirs"] == str(tmp_path)
    # With one broker any replication factor above 1 leaves internal topics unavailable.
    for key, value in props.items():
        if key.endswith((".replication.factor", ".min.isr")):
            assert value == "1", key


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
