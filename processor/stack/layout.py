"""The state folder of the local stack: one data folder per process, logs, pid files.

<root>/kafka/            server.properties, data/ (KRaft metadata and topic logs)
<root>/kafka-<n>/        the same for node n of a Kafka cluster (STACK_KAFKA_BROKERS > 1)
<root>/kafka-cluster.id  the cluster id all nodes of a cluster were formatted with
<root>/kafka-secure/     the same for the secured node (STACK_KAFKA_SECURE), and sasl-password
<root>/kafka-tls/        the secured node's CA, certificates and keystore (see kafka_tls.py)
<root>/client.env        the secured node's client settings (KAFKA_*), SASL_SSL with SCRAM
<root>/client-mtls.env   the same for its mutual-TLS port
<root>/phoenix/          Phoenix working dir (SQLite database)
<root>/mlflow/           mlflow.db (SQLite) and artifacts/
<root>/logs/<name>.log   stdout and stderr of each process, appended across restarts
<root>/pids/<name>.pid   the process id, which is also its process group id

A process is named after its service (``kafka``, ``phoenix``, ``mlflow``), except the nodes of
a Kafka cluster: ``kafka-1``, ``kafka-2``, ..., and the secured Kafka node: ``kafka-secure``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from pydantic import SecretStr

from processor.errors import StackError

ServiceName = Literal["kafka", "phoenix", "mlflow"]
SERVICE_NAMES: tuple[ServiceName, ...] = ("kafka", "phoenix", "mlflow")


def parse_service_names(names: Iterable[str]) -> tuple[ServiceName, ...]:
    """Validate service names, keeping the stack's order and dropping repeats."""
    wanted = set(names)
    unknown = sorted(wanted - set(SERVICE_NAMES))
    if unknown:
        raise StackError(
            f"unknown service {', '.join(unknown)}; choose from {', '.join(SERVICE_NAMES)}"
        )
    return tuple(cast(ServiceName, name) for name in SERVICE_NAMES if name in wanted)


@dataclass(frozen=True)
class StackLayout:
    """Absolute paths inside one state folder; creating it is left to the caller."""

    root: Path

    @classmethod
    def at(cls, root: Path) -> StackLayout:
        # Absolute, because services run with their own working directory.
        return cls(root.expanduser().resolve())

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def pids_dir(self) -> Path:
        return self.root / "pids"

    @property
    def kafka_cluster_id_path(self) -> Path:
        return self.root / "kafka-cluster.id"

    @property
    def kafka_tls(self) -> KafkaTlsFiles:
        return KafkaTlsFiles(self.root / "kafka-tls")

    def kafka_client_env_path(self, *, mutual_tls: bool = False) -> Path:
        return self.root / ("client-mtls.env" if mutual_tls else "client.env")

    def data_dir(self, process_name: str) -> Path:
        return self.root / process_name

    def log_path(self, process_name: str) -> Path:
        return self.logs_dir / f"{process_name}.log"

    def pid_path(self, process_name: str) -> Path:
        return self.pids_dir / f"{process_name}.pid"

    def recorded_processes(self) -> list[str]:
        """The names of the processes with a pid file, running or not."""
        return sorted(path.stem for path in self.pids_dir.glob("*.pid"))


@dataclass(frozen=True)
class KafkaTlsFiles:
    """The secured Kafka's certificates, keys and keystore password (kafka_tls.py makes them)."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def broker_keystore(self) -> Path:
        return self.folder / "broker.p12"

    @property
    def keystore_password_path(self) -> Path:
        return self.folder / "keystore-password"

    @property
    def client_certificate(self) -> Path:
        return self.folder / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.folder / "client-key.pem"

    @property
    def other_ca(self) -> Path:
        return self.folder / "other-ca.pem"

    @property
    def paths(self) -> tuple[Path, ...]:
        return (
            self.ca,
            self.broker_keystore,
            self.keystore_password_path,
            self.client_certificate,
            self.client_key,
            self.other_ca,
        )

    def complete(self) -> bool:
        return all(path.is_file() for path in self.paths)

    def keystore_password(self) -> SecretStr:
        return SecretStr(self.keystore_password_path.read_text().strip())


def write_file(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``data`` to ``path`` whole or not at all; ``private`` (a key, a password, what
    holds one) as mode 0600, else 0644."""
    # A fresh file (O_EXCL), so that its mode is ours and not that of a file left behind.
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.unlink(missing_ok=True)
    descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.replace(scratch, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            scratch.unlink()
