"""Where each node of the local Kafka runs.

The stack's Kafka is one KRaft node, or a cluster of ``STACK_KAFKA_BROKERS`` nodes. Every node
is a combined broker and controller, and every one is a voter of the controller quorum: with
three, the cluster keeps working with any one of them down (two voters are a majority, two
brokers hold every partition's in-sync replicas).

Node n (from 1) listens for clients on ``STACK_KAFKA_PORT + 2(n-1)`` and for the quorum on
``STACK_KAFKA_CONTROLLER_PORT + 2(n-1)``: with the defaults 9092/9093, 9094/9095, 9096/9097.
A single node keeps the names it always had (process ``kafka``: ``kafka/``, ``kafka.log``,
``kafka.pid``), so an existing state folder stays valid; a cluster's are ``kafka-<n>``.

The secured node (``STACK_KAFKA_SECURE``, always alone) is process ``kafka-secure``: SCRAM users
are written into the storage when it is formatted, so it keeps data of its own, and switching
between plaintext and secured leaves each one's topics where they were. It also listens for
mutual-TLS clients on ``STACK_KAFKA_MTLS_PORT``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from processor.settings import StackSettings
from processor.stack.ports import LOOPBACK

PORT_STEP = 2
SECURE_PROCESS = "kafka-secure"
_NODE_PROCESS = re.compile(r"kafka(?:-(\d+)|-secure)?")


@dataclass(frozen=True, slots=True)
class KafkaNode:
    """One Kafka process: its KRaft node id, its ports, and the name of its files.

    A node with an ``mtls_port`` is secured: SASL_SSL on ``port``, mutual TLS on ``mtls_port``.
    """

    node_id: int
    port: int
    controller_port: int
    process_name: str
    mtls_port: int | None = None

    @property
    def secure(self) -> bool:
        return self.mtls_port is not None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def port_offset(self) -> int:
        """How far this node's ports are from the ones the settings name."""
        return PORT_STEP * (self.node_id - 1)


def kafka_nodes(settings: StackSettings) -> tuple[KafkaNode, ...]:
    """The nodes the settings ask for, node 1 first."""
    if settings.kafka_secure:
        return (
            KafkaNode(
                1,
                settings.kafka_port,
                settings.kafka_controller_port,
                SECURE_PROCESS,
                mtls_port=settings.kafka_mtls_port,
            ),
        )
    if settings.kafka_brokers == 1:
        return (KafkaNode(1, settings.kafka_port, settings.kafka_controller_port, "kafka"),)
    return tuple(
        KafkaNode(
            node_id,
            settings.kafka_port + PORT_STEP * (node_id - 1),
            settings.kafka_controller_port + PORT_STEP * (node_id - 1),
            f"kafka-{node_id}",
        )
        for node_id in range(1, settings.kafka_brokers + 1)
    )


def node_id_of(process_name: str) -> int | None:
    """The node id a Kafka process name stands for (``kafka`` and ``kafka-secure`` are 1),
    None for other names."""
    match = _NODE_PROCESS.fullmatch(process_name)
    if match is None:
        return None
    return int(match.group(1)) if match.group(1) else 1


def node_of_process(process_name: str, ports: tuple[int, ...]) -> KafkaNode | None:
    """The node a running Kafka process is, from its name and the ports it was started with
    (client and controller, then the mutual-TLS one of a secured node); None when they do not
    fit together."""
    node_id = node_id_of(process_name)
    secure = process_name == SECURE_PROCESS
    if node_id is None or len(ports) != (3 if secure else 2):
        return None
    mtls_port = ports[2] if secure else None
    return KafkaNode(node_id, ports[0], ports[1], process_name, mtls_port=mtls_port)


def bootstrap_servers(nodes: Iterable[KafkaNode]) -> str:
    """Every node's client address, comma-separated, as KAFKA_BOOTSTRAP_SERVERS spells it."""
    return ",".join(node.address for node in nodes)
