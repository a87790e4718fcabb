"""The state folder of the local stack: one data folder per process, logs, pid files.

<root>/kafka/            server.properties, data/ (KRaft metadata and topic logs)
<root>/kafka-<n>/        the same for node n of a Kafka cluster (STACK_KAFKA_BROKERS > 1)
<root>/kafka-cluster.id  the cluster id all nodes of a cluster were formatted with
<root>/phoenix/          Phoenix working dir (SQLite database)
<root>/mlflow/           mlflow.db (SQLite) and artifacts/
<root>/logs/<name>.log   stdout and stderr of each process, appended across restarts
<root>/pids/<name>.pid   the process id, which is also its process group id

A process is named after its service (``kafka``, ``phoenix``, ``mlflow``), except the nodes of
a Kafka cluster: ``kafka-1``, ``kafka-2``, ...
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

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

    def data_dir(self, process_name: str) -> Path:
        return self.root / process_name

    def log_path(self, process_name: str) -> Path:
        return self.logs_dir / f"{process_name}.log"

    def pid_path(self, process_name: str) -> Path:
        return self.pids_dir / f"{process_name}.pid"

    def recorded_processes(self) -> list[str]:
        """The names of the processes with a pid file, running or not."""
        return sorted(path.stem for path in self.pids_dir.glob("*.pid"))
