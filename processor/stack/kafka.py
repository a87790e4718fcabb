"""Apache Kafka on 127.0.0.1: each node a KRaft broker and controller in one JVM.

One `KafkaService` runs one node (`kafka_nodes` says where each runs). The nodes of a cluster
are formatted with one cluster id, made on the first start and kept in the state folder.

A secured node (``STACK_KAFKA_SECURE``, see kafka_secure.py) keeps the SASL user's password
beside its storage: made when the SCRAM credentials are written into it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import subprocess
import threading
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from pydantic import SecretStr, ValidationError

from processor.errors import StackError
from processor.kafka_security import aiokafka_security_options
from processor.replication import min_insync_for, replication_for
from processor.settings import KafkaClientSettings, StackSettings
from processor.stack.kafka_jars import KafkaClasspath, find_java, resolve_kafka_classpath
from processor.stack.kafka_nodes import KafkaNode
from processor.stack.kafka_secure import (
    SASL_USERNAME,
    BrokerSecurity,
    loggable_command,
    scram_format_options,
    secured_client_env,
    secured_listeners,
)
from processor.stack.layout import ServiceName, StackLayout, write_file
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


def server_properties(
    node: KafkaNode,
    voters: tuple[KafkaNode, ...],
    data_dir: Path,
    security: BrokerSecurity | None = None,
) -> str:
    """One node's configuration: loopback only, every node of ``voters`` in the quorum; with
    ``security`` (for a node with an mTLS port) its client listeners are the secured ones."""
    replication = replication_for(len(voters))
    min_insync = min_insync_for(replication)
    listeners = (
        _plaintext_listeners(node) if security is None else secured_listeners(node, security)
    )
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.quorum.voters": ",".join(
            f"{voter.node_id}@{LOOPBACK}:{voter.controller_port}" for voter in voters
        ),
        **listeners,
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


def _plaintext_listeners(node: KafkaNode) -> dict[str, str]:
    return {
        "listeners": (
            f"PLAINTEXT://{LOOPBACK}:{node.port},CONTROLLER://{LOOPBACK}:{node.controller_port}"
        ),
        "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{node.port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
    }


def java_argument_file(arguments: Sequence[str]) -> str:
    """``arguments`` as a `java @file` argument file: one per line, each in double quotes
    (inside which the launcher reads backslash escapes)."""
    quoted = (argument.replace("\\", "\\\\").replace('"', '\\"') for argument in arguments)
    return "".join(f'"{argument}"\n' for argument in quoted)


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
        self._tls = layout.kafka_tls
        # The health check's client settings (a secured node's), made at its first probe.
        self._probe_settings: KafkaClientSettings | None = None

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
        ports = {
            f"kafka_port{suffix}": self.node.port,
            f"kafka_controller_port{suffix}": self.node.controller_port,
        }
        if self.node.mtls_port is not None:
            ports["kafka_mtls_port"] = self.node.mtls_port
        return ports

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def _properties_path(self) -> Path:
        return self._home / "server.properties"

    @property
    def _data_dir(self) -> Path:
        return self._home / "data"

    @property
    def _sasl_password_path(self) -> Path:
        return self._home / "sasl-password"

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
        formatted = (self._data_dir / "meta.properties").exists()
        security = self._security(say, formatted=formatted) if self.node.secure else None
        self._probe_settings = None  # the certificates may be new
        # Rewritten on every start, so changed ports take effect; the data stays. Private: a
        # secured node's holds passwords.
        properties = server_properties(self.node, self._voters, self._data_dir, security)
        write_file(self._properties_path, properties.encode(), private=True)
        jvm = [java, _HEAP, *self._logging_flags(classpath), "-cp", classpath.classpath]
        if not formatted:
            say("formatting Kafka storage (first start only)")
            self._format_storage(jvm, security)
        return LaunchSpec(command=[*jvm, "kafka.Kafka", str(self._properties_path)], cwd=self._home)

    def _security(self, say: Say, *, formatted: bool) -> BrokerSecurity:
        # Here, not at the top: cryptography comes with the stack extra, and the CLI (which
        # imports this module) runs without it.
        try:
            from processor.stack.kafka_tls import ensure_tls_files
        except ImportError as exc:
            raise StackError(
                "the secured Kafka's certificates need the cryptography package; install the "
                "stack extra: pip install 'agent-trace-processor[stack]'"
            ) from exc
        if ensure_tls_files(self._tls, now=datetime.now(UTC)):
            say(f"made a throwaway CA and certificates in {self._tls.folder}")
        return BrokerSecurity(
            keystore=self._tls.broker_keystore,
            keystore_password=self._tls.keystore_password(),
            truststore=self._tls.ca,
            sasl_username=SASL_USERNAME,
            sasl_password=self._sasl_password(formatted=formatted),
        )

    def _sasl_password(self, *, formatted: bool) -> SecretStr:
        """The SASL user's password, made when the storage is formatted with it."""
        path = self._sasl_password_path
        if path.is_file():
            return SecretStr(path.read_text().strip())
        if formatted:
            raise StackError(
                f"{path} is gone, but the storage in {self._data_dir} holds that password's "
                f"SCRAM credentials; run `trace-processor stack down kafka`, delete "
                f"{self._home} (its topics go with it) and start again"
            )
        password = secrets.token_hex(24)
        write_file(path, f"{password}\n".encode(), private=True)
        return SecretStr(password)

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

    def _format_storage(self, jvm: list[str], security: BrokerSecurity | None) -> None:
        log_path = self._layout.log_path(self.process_name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        java = jvm[0]
        arguments = [
            *jvm[1:], "kafka.tools.StorageTool", "format", "--ignore-formatted",
            "-t", self._cluster_id(), "-c", str(self._properties_path),
        ]  # fmt: skip
        hidden: list[SecretStr] = []
        if security is not None:
            arguments += scram_format_options(security.sasl_username, security.sasl_password)
            hidden.append(security.sasl_password)
        # In a file rather than on the command line, which every local user can read (ps):
        # the SCRAM options hold the password.
        argument_file = self._home / "format.args"
        write_file(argument_file, java_argument_file(arguments).encode(), private=True)
        shown = loggable_command([java, *arguments], hidden)
        try:
            result = self._run_storage_tool([java, f"@{argument_file}"], shown, log_path)
        finally:
            argument_file.unlink(missing_ok=True)
        if result.returncode != 0:
            raise StackError(
                f"formatting Kafka storage failed (exit {result.returncode}); see {log_path}; "
                f"if {self._data_dir} holds a broken earlier attempt, delete it and retry"
            )

    def _run_storage_tool(
        self, command: list[str], shown: str, log_path: Path
    ) -> subprocess.CompletedProcess[bytes]:
        with log_path.open("ab") as log:
            log.write(f"\n--- formatting storage: {shown}\n".encode())
            log.flush()
            try:
                return subprocess.run(
                    command, cwd=self._home, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, timeout=_FORMAT_TIMEOUT_S, check=False,
                )  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                raise StackError(
                    f"formatting Kafka storage took over {_FORMAT_TIMEOUT_S:.0f} s; see {log_path}"
                ) from exc

    def client_env(self, *, mutual_tls: bool = False) -> dict[str, str]:
        """A secured node's client settings (see `secured_client_env`); StackError when the
        node has never been started, so its certificates or password do not exist yet."""
        if not self.node.secure:
            raise StackError(f"{self.process_name} is not the secured Kafka node")
        if not self._tls.complete() or not self._sasl_password_path.is_file():
            raise StackError(
                f"the secured Kafka of {self._layout.root} has not been started yet; run "
                "`trace-processor stack up --secure kafka`"
            )
        password = SecretStr(self._sasl_password_path.read_text().strip())
        return secured_client_env(self.node, self._tls, password, mutual_tls=mutual_tls)

    def is_healthy(self) -> bool:
        # A cheap connect first: aiokafka logs an error for every refused connection.
        if not port_accepts_connections(self.node.port):
            return False
        try:
            security = self._probe_security()
            return asyncio.run(_broker_answers_metadata(self.address, self.node.node_id, security))
        except (TimeoutError, KafkaError, OSError, StackError, ValidationError):
            return False

    def _probe_security(self) -> dict[str, Any]:
        """The health check's client options: a secured node's are its SASL_SSL clients'."""
        if not self.node.secure:
            return {}
        if self._probe_settings is None:
            # Validated like a user's settings, so the check also proves the ones we hand out.
            self._probe_settings = KafkaClientSettings.model_validate(self.client_env())
        return aiokafka_security_options(self._probe_settings)


async def _broker_answers_metadata(
    bootstrap: str, node_id: int, security: Mapping[str, Any]
) -> bool:
    """A real Metadata round trip, the first request every producer and consumer makes; the
    node counts once it lists itself, which it does once the quorum has registered it.
    ``security`` holds aiokafka's TLS and SASL options for a secured node."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="trace-processor-stack",
        request_timeout_ms=_PROBE_TIMEOUT_MS,
        **security,
    )
    try:
        async with asyncio.timeout(2 * _PROBE_TIMEOUT_MS / 1000):
            await admin.start()
            cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    return any(broker.get("node_id") == node_id for broker in cluster.get("brokers", []))
