"""Apache Kafka on 127.0.0.1: each node a KRaft broker and controller in one JVM.

One `KafkaService` runs one node (`kafka_nodes` says where each runs). The nodes of a cluster
are formatted with one cluster id, made on the first start and kept in the state folder.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import threading
import uuid
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from processor.errors import StackError
from processor.replication import min_insync_for, replication_for
from processor.settings import StackSettings
from processor.stack.kafka_jars import KafkaClasspath, find_java, resolve_kafka_classpath
from processor.stack.kafka_nodes import KafkaNode
from processor.stack.layout import ServiceName, StackLayout
from processor.stack.ports import LOOPBACK, port_accepts_connections
from processor.stack.service import LaunchSpec, Say

_HEAP = "-Xmx512m"
# The nodes of a cluster prepare in parallel; one fetches the jars, the others then find them.
_CLASSPATH_LOCK = threading.Lock()
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


def shared_cluster_id(path: Path) -> str:
    """The id every node of a cluster is formatted with: read from ``path``, made once.

    The nodes start in parallel threads; the first to link its candidate into place wins and
    the others read the winner's, so no two nodes are formatted into different clusters.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        candidate = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        candidate.write_text(f"{new_cluster_id()}\n")
        try:
            os.link(candidate, path)
        except FileExistsError:
            pass
        finally:
            candidate.unlink(missing_ok=True)
    return path.read_text().strip()


def server_properties(node: KafkaNode, voters: tuple[KafkaNode, ...], data_dir: Path) -> str:
    """One node's configuration: loopback only, every node of ``voters`` in the quorum."""
    replication = replication_for(len(voters))
    min_insync = min_insync_for(replication)
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.quorum.voters": ",".join(
            f"{voter.node_id}@{LOOPBACK}:{voter.controller_port}" for voter in voters
        ),
        "listeners": (
            f"PLAINTEXT://{LOOPBACK}:{node.port},CONTROLLER://{LOOPBACK}:{node.controller_port}"
        ),
        "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{node.port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data_dir),
        # Internal topics as replicated as the nodes allow: one node cannot hold a second
        # replica, and on a cluster the groups' offsets must outlive a broker.
        "offsets.topic.replication.factor": str(replication),
        "transaction.state.log.replication.factor": str(replication),
        "transaction.state.log.min.isr": str(min_insync),
        "share.coordinator.state.topic.replication.factor": str(replication),
        "share.coordinator.state.topic.min.isr": str(min_insync),
        # Topics created without saying (auto-created ones) get the same, and an acks=all
        # write on a cluster waits for two brokers unless a topic says otherwise.
        "default.replication.factor": str(replication),
        "min.insync.replicas": str(min_insync),
        # Consumer groups start at once instead of waiting 3 s for more members.
        "group.initial.rebalance.delay.ms": "0",
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


class KafkaService:
    """One Kafka node in KRaft mode; its storage is formatted on its first start only."""

    def __init__(
        self,
        settings: StackSettings,
        layout: StackLayout,
        node: KafkaNode,
        voters: tuple[KafkaNode, ...],
    ) -> None:
        self._settings = settings
        self._layout = layout
        self.node = node
        self._voters = voters
        self._home = layout.data_dir(node.process_name)

    @property
    def name(self) -> ServiceName:
        return "kafka"

    @property
    def process_name(self) -> str:
        return self.node.process_name

    @property
    def ports(self) -> dict[str, int]:
        # Keyed by setting; a later node's say how far from it they are ("kafka_port+2").
        suffix = f"+{self.node.port_offset}" if self.node.port_offset else ""
        return {
            f"kafka_port{suffix}": self.node.port,
            f"kafka_controller_port{suffix}": self.node.controller_port,
        }

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def _properties_path(self) -> Path:
        return self._home / "server.properties"

    @property
    def _data_dir(self) -> Path:
        return self._home / "data"

    def prepare(self, say: Say) -> LaunchSpec:
        java = find_java()
        with _CLASSPATH_LOCK:
            classpath = resolve_kafka_classpath(
                kafka_home=self._settings.kafka_home,
                cache_dir=self._settings.cache_dir,
                maven_log=self._layout.log_path("maven"),
                say=say,
            )
        self._data_dir.mkdir(parents=True, exist_ok=True)
        # Rewritten on every start, so changed ports take effect; the data stays.
        self._properties_path.write_text(server_properties(self.node, self._voters, self._data_dir))
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

    def _cluster_id(self) -> str:
        if len(self._voters) == 1:
            return new_cluster_id()
        return shared_cluster_id(self._layout.kafka_cluster_id_path)

    def _format_storage(self, jvm: list[str]) -> None:
        log_path = self._layout.log_path(self.process_name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            *jvm, "kafka.tools.StorageTool", "format", "--ignore-formatted",
            "-t", self._cluster_id(), "-c", str(self._properties_path),
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
        if not port_accepts_connections(self.node.port):
            return False
        try:
            return asyncio.run(_broker_answers_metadata(self.address, self.node.node_id))
        except (TimeoutError, KafkaError, OSError):
            return False


async def _broker_answers_metadata(bootstrap: str, node_id: int) -> bool:
    """A real Metadata round trip, the first request every producer and consumer makes; the
    node counts once it lists itself, which it does once the quorum has registered it."""
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
    return any(broker.get("node_id") == node_id for broker in cluster.get("brokers", []))
