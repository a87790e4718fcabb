"""Apache Kafka as one KRaft node (broker and controller in one JVM) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import uuid
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from processor.errors import StackError
from processor.settings import StackSettings
from processor.stack.kafka_jars import KafkaClasspath, find_java, resolve_kafka_classpath
from processor.stack.layout import ServiceName, StackLayout
from processor.stack.ports import LOOPBACK, port_accepts_connections
from processor.stack.service import LaunchSpec, Say

_NODE_ID = 1
_HEAP = "-Xmx512m"
_FORMAT_TIMEOUT_S = 120.0
_PROBE_TIMEOUT_MS = 3000
# slf4j-simple (the Maven setup) logs to stderr; these give its lines a timestamp.
_SLF4J_SIMPLE_FLAGS = (
    "-Dorg.slf4j.simpleLogger.showDateTime=true",
    "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd'T'HH:mm:ss.SSS",
)


def new_cluster_id() -> str:
    """A KRaft cluster id in Kafka's own format: a random UUID, base64url without padding."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        # Kafka avoids a leading "-" too: the storage tool would read it as an option.
        if not cluster_id.startswith("-"):
            return cluster_id


def server_properties(*, port: int, controller_port: int, data_dir: Path) -> str:
    """The broker configuration of a single-node KRaft cluster listening on loopback only."""
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(_NODE_ID),
        "controller.quorum.voters": f"{_NODE_ID}@{LOOPBACK}:{controller_port}",
        "listeners": f"PLAINTEXT://{LOOPBACK}:{port},CONTROLLER://{LOOPBACK}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data_dir),
        # One node: internal topics cannot have more than one replica.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Consumer groups start at once instead of waiting 3 s for more members.
        "group.initial.rebalance.delay.ms": "0",
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


class KafkaService:
    """Kafka in KRaft mode; storage is formatted on the first start only."""

    def __init__(self, settings: StackSettings, layout: StackLayout) -> None:
        self._settings = settings
        self._layout = layout
        self._home = layout.data_dir("kafka")

    @property
    def name(self) -> ServiceName:
        return "kafka"

    @property
    def ports(self) -> dict[str, int]:
        return {
            "kafka_port": self._settings.kafka_port,
            "kafka_controller_port": self._settings.kafka_controller_port,
        }

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self._settings.kafka_port}"

    @property
    def _properties_path(self) -> Path:
        return self._home / "server.properties"

    @property
    def _data_dir(self) -> Path:
        return self._home / "data"

    def prepare(self, say: Say) -> LaunchSpec:
        java = find_java()
        classpath = resolve_kafka_classpath(
            kafka_home=self._settings.kafka_home,
            cache_dir=self._settings.cache_dir,
            maven_log=self._layout.log_path("maven"),
            say=say,
        )
        self._data_dir.mkdir(parents=True, exist_ok=True)
        # Rewritten on every start, so changed ports take effect; the data stays.
        self._properties_path.write_text(
            server_properties(
                port=self._settings.kafka_port,
                controller_port=self._settings.kafka_controller_port,
                data_dir=self._data_dir,
            )
        )
        jvm = [java, _HEAP, *self._logging_flags(classpath), "-cp", classpath.classpath]
        if not (self._data_dir / "meta.properties").exists():
            say("formatting Kafka storage (first start only)")
            self._format_storage(jvm)
        return LaunchSpec(command=[*jvm, "kafka.Kafka", str(self._properties_path)], cwd=self._home)

    def _logging_flags(self, classpath: KafkaClasspath) -> list[str]:
        if classpath.log4j_config is None:
            return list(_SLF4J_SIMPLE_FLAGS)
        return [
            f"-Dlog4j2.configurationFile={classpath.log4j_config}",
            f"-Dkafka.logs.dir={self._home / 'logs'}",
        ]

    def _format_storage(self, jvm: list[str]) -> None:
        log_path = self._layout.log_path("kafka")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            *jvm, "kafka.tools.StorageTool", "format", "--ignore-formatted",
            "-t", new_cluster_id(), "-c", str(self._properties_path),
        ]  # fmt: skip
        with log_path.open("ab") as log:
            log.write(f"\n--- formatting storage: {' '.join(command)}\n".encode())
            log.flush()
            try:
                result = subprocess.run(
                    command, cwd=self._home, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, timeout=_FORMAT_TIMEOUT_S, check=False,
                )  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                raise StackError(
                    f"formatting Kafka storage took over {_FORMAT_TIMEOUT_S:.0f} s; see {log_path}"
                ) from exc
        if result.returncode != 0:
            raise StackError(
                f"formatting Kafka storage failed (exit {result.returncode}); see {log_path}; "
                f"if {self._data_dir} holds a broken earlier attempt, delete it and retry"
            )

    def is_healthy(self) -> bool:
        # A cheap connect first: aiokafka logs an error for every refused connection.
        if not port_accepts_connections(self._settings.kafka_port):
            return False
        try:
            return asyncio.run(_broker_answers_metadata(self.address))
        except (TimeoutError, KafkaError, OSError):
            return False


async def _broker_answers_metadata(bootstrap: str) -> bool:
    """A real Metadata round trip, the first request every producer and consumer makes."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="trace-processor-stack",
        request_timeout_ms=_PROBE_TIMEOUT_MS,
    )
    try:
        async with asyncio.timeout(2 * _PROBE_TIMEOUT_MS / 1000):
            await admin.start()
            cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    return any(broker.get("node_id") == _NODE_ID for broker in cluster.get("brokers", []))
