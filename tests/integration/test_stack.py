"""The local stack against the real programs: Kafka (KRaft), Phoenix and MLflow.

One stack is started for the module on ports next to no one else's (29092, 26006, 25000, ...)
and a state folder of its own; the tests run in file order, from `up` to `down`. The Kafka
jars come from the shared cache (STACK_CACHE_DIR), so only the first run anywhere pays for
Maven.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import processor
from processor.errors import StackError
from processor.settings import StackSettings
from processor.stack import LocalStack
from processor.stack.process import group_is_alive

pytestmark = pytest.mark.integration

PORTS = {
    "kafka_port": 29092,
    "kafka_controller_port": 29093,
    "phoenix_port": 26006,
    "phoenix_grpc_port": 24317,
    "mlflow_port": 25000,
}
TOPIC = "stack-test"
PROJECT = "stack-test-project"


def _settings(state_dir: Path, **overrides: object) -> StackSettings:
    return StackSettings.model_validate({"dir": state_dir, **PORTS, **overrides})


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _http() -> httpx.Client:
    return httpx.Client(timeout=10, trust_env=False)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="module")
def stack(state_dir: Path) -> Iterator[LocalStack]:
    for port in PORTS.values():
        if _listening(port):
            pytest.fail(f"port {port} is in use before the test started; stop what holds it")
    local_stack = LocalStack(_settings(state_dir, start_timeout_s=300))
    try:
        yield local_stack
    finally:
        local_stack.down()


async def _kafka_round_trip(bootstrap: str, payload: bytes) -> bytes:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        if TOPIC not in await admin.list_topics():
            await admin.create_topics([NewTopic(TOPIC, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(TOPIC, payload, key=payload)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        TOPIC, bootstrap_servers=bootstrap, group_id="stack-test", auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        async with asyncio.timeout(60):
            while True:
                message = await consumer.getone()
                if message.value == payload:
                    await consumer.commit()  # the group coordinator works, too
                    return message.value
    finally:
        await consumer.stop()


async def _kafka_topics(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return await admin.list_topics()
    finally:
        await admin.close()


def _phoenix_projects(phoenix_url: str) -> list[str]:
    with _http() as client:
        response = client.get(f"{phoenix_url}/v1/projects")
    response.raise_for_status()
    return [project["name"] for project in response.json()["data"]]


def test_up_starts_services_that_really_work(stack: LocalStack, state_dir: Path) -> None:
    endpoints = stack.up()

    assert endpoints.kafka_bootstrap == "127.0.0.1:29092"
    assert endpoints.phoenix_url == "http://127.0.0.1:26006"
    assert endpoints.mlflow_url == "http://127.0.0.1:25000"
    assert asyncio.run(_kafka_round_trip(endpoints.kafka_bootstrap, b"hello")) == b"hello"
    with _http() as client:
        created = client.post(f"{endpoints.phoenix_url}/v1/projects", json={"name": PROJECT})
        assert created.status_code == 200, created.text
        # MLflow's host check must accept both spellings of the local host.
        for base in (endpoints.mlflow_url, "http://localhost:25000"):
            experiments = client.post(
                f"{base}/api/2.0/mlflow/experiments/search", json={"max_results": 10}
            )
            assert experiments.status_code == 200, experiments.text
    # Everything lives in the one state folder.
    assert (state_dir / "kafka" / "data" / "meta.properties").is_file()
    assert (state_dir / "phoenix" / "phoenix.db").is_file()
    assert (state_dir / "mlflow" / "mlflow.db").is_file()
    for name in ("kafka", "phoenix", "mlflow"):
        assert stack.log_path(name) == state_dir / "logs" / f"{name}.log"
        assert stack.log_path(name).stat().st_size > 0
        assert (state_dir / "pids" / f"{name}.pid").is_file()


def test_status_says_every_service_runs_and_answers(stack: LocalStack, state_dir: Path) -> None:
    statuses = stack.status()

    assert set(statuses) == {"kafka", "phoenix", "mlflow"}
    for name, status in statuses.items():
        assert status.running and status.healthy, status
        assert status.pid == int((state_dir / "pids" / f"{name}.pid").read_text())
    assert statuses["phoenix"].url == "http://127.0.0.1:26006"


def test_up_again_leaves_running_services_alone(stack: LocalStack) -> None:
    pids_before = {name: status.pid for name, status in stack.status().items()}
    log_sizes = {name: stack.log_path(name).stat().st_size for name in pids_before}

    stack.up()

    assert {name: status.pid for name, status in stack.status().items()} == pids_before
    for name, size in log_sizes.items():
        assert "stack: starting" not in stack.log_path(name).read_text()[size:]


def test_a_port_taken_by_a_stranger_is_reported(tmp_path: Path) -> None:
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        other = LocalStack(_settings(tmp_path, kafka_port=port, kafka_controller_port=29193))

        with pytest.raises(StackError) as caught:
            other.up(["kafka"])

    message = str(caught.value)
    assert f"port {port} for kafka is already in use by pid {os.getpid()}" in message
    assert "STACK_KAFKA_PORT" in message
    assert not (tmp_path / "pids" / "kafka.pid").exists()


def test_a_second_stack_on_the_same_ports_is_refused(stack: LocalStack, tmp_path: Path) -> None:
    other = LocalStack(_settings(tmp_path))

    with pytest.raises(StackError, match="port 25000 for mlflow is already in use"):
        other.up(["mlflow"])
    assert stack.status()["mlflow"].healthy


def test_a_service_that_dies_while_starting_is_reported_with_its_log(tmp_path: Path) -> None:
    broken = LocalStack(_settings(tmp_path, mlflow_port=25100), mlflow_args=["--no-such-option"])

    with pytest.raises(StackError) as caught:
        broken.up(["mlflow"])

    message = str(caught.value)
    assert message.startswith("mlflow exited with code 2 while starting; see ")
    assert str(tmp_path / "logs" / "mlflow.log") in message
    assert "--no-such-option" in message  # the log's last lines say why
    assert not broken.status()["mlflow"].running


def test_a_service_that_does_not_answer_in_time_is_stopped(tmp_path: Path) -> None:
    slow = LocalStack(
        _settings(tmp_path, phoenix_port=26106, phoenix_grpc_port=24417, start_timeout_s=1)
    )

    with pytest.raises(StackError, match=r"phoenix did not answer within 1 s and was stopped"):
        slow.up(["phoenix"])

    assert not (tmp_path / "pids" / "phoenix.pid").exists()
    assert not _listening(26106) and not _listening(24417)


def test_a_killed_service_is_started_again_with_its_data(stack: LocalStack) -> None:
    old_pid = stack.status()["kafka"].pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)  # leaves a stale pid file behind

    stack.up(["kafka"])

    status = stack.status()["kafka"]
    assert status.healthy and status.pid != old_pid
    assert TOPIC in asyncio.run(_kafka_topics(stack.endpoints.kafka_bootstrap))


def test_stop_and_start_keep_phoenix_data(stack: LocalStack) -> None:
    phoenix_url = stack.endpoints.phoenix_url

    stack.stop("phoenix")
    assert not _listening(26006)
    assert not stack.status()["phoenix"].running
    assert stack.status()["kafka"].healthy  # the others are not touched
    stack.start("phoenix")

    assert stack.status()["phoenix"].healthy
    assert PROJECT in _phoenix_projects(phoenix_url)


def test_the_cli_starts_services_that_outlive_it(tmp_path: Path) -> None:
    project_root = Path(processor.__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(project_root), os.getenv("PYTHONPATH")])),
        "STACK_DIR": str(tmp_path),
        "STACK_KAFKA_PORT": "29192",
        "STACK_KAFKA_CONTROLLER_PORT": "29193",
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", "from processor.stack.cli import stack_group as g; g()"]
        return subprocess.run(
            [*command, *args], env=env, capture_output=True, text=True, timeout=600, check=False
        )

    started = cli("up", "kafka")
    try:
        assert started.returncode == 0, started.stderr
        assert "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:29192" in started.stdout
        # The CLI has exited; the broker it started still serves requests.
        assert asyncio.run(_kafka_topics("127.0.0.1:29192")) is not None
        status = cli("status")
        assert re.search(r"kafka\s*│\s*running", status.stdout), status.stdout
        taken = cli("up", "kafka")  # already running: harmless
        assert taken.returncode == 0, taken.stderr
        assert "already running" in taken.stdout
    finally:
        stopped = cli("down")
    assert stopped.returncode == 0, stopped.stderr
    assert not _listening(29192) and not _listening(29193)

    env["STACK_MLFLOW_PORT"] = "29192"
    clash = cli("up")
    assert clash.returncode == 1
    assert "STACK_KAFKA_PORT and STACK_MLFLOW_PORT are both 29192" in clash.stderr
    env["STACK_MLFLOW_PORT"] = "not-a-port"
    invalid = cli("status")
    assert invalid.returncode == 1
    assert "mlflow_port" in invalid.stderr and "Traceback" not in invalid.stderr


def test_down_stops_everything(stack: LocalStack, state_dir: Path) -> None:
    pids = [status.pid for status in stack.status().values()]

    stack.down()

    for status in stack.status().values():
        assert not status.running and not status.healthy
    for pid in pids:
        assert pid is not None and not group_is_alive(pid)
    for port in PORTS.values():
        assert not _listening(port), port
    assert not list((state_dir / "pids").glob("*.pid"))
    stack.down()  # again: harmless
