"""The only Kafka broker killed (SIGKILL) mid-stream and started again: nothing lost or doubled.

With one broker there is no failover: while it is down nothing is written or read, the load
generator's producer holds what it accepted, the worker's consumers and producer retry. When
it is back (same data folder and port, after the log recovery an unclean stop asks for),
everything carries on from where it was: the rollups in MLflow equal the truth of all that was
published, and every kept span reaches Phoenix once (tests/integration/broker_faults.py).

The broker is the test's own, a one-node stack like the session's (Kafka only; Phoenix and
MLflow are the session's), so that killing it disturbs no other test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from processor.stack import LocalStack, StackEndpoints
from processor.stack.ports import port_accepts_connections
from tests.integration.broker_faults import Traffic, run_through_broker_fault

pytestmark = pytest.mark.integration

# Covers the outage: the time the broker takes to start again and recover its logs, and the
# clients to reconnect. Spans published meanwhile arrive that much later than their end.
LATENESS_MS = 60_000
TRACES_WHILE_DOWN = 10


class KillTheBroker:
    """Kill the one broker; while it is down, traffic goes on into the producer's buffer."""

    def __init__(self, broker: LocalStack) -> None:
        self._broker = broker
        self._node = broker.kafka_nodes[0]

    def kill(self, env: dict[str, str]) -> None:
        self._broker.kill_broker(self._node.node_id)

    def while_down(self, env: dict[str, str], traffic: Traffic) -> None:
        # Traces made during the outage reach Kafka only once it is back.
        traffic.wait_for(len(traffic.sent) + TRACES_WHILE_DOWN, timeout_s=60)
        assert not port_accepts_connections(self._node.port), "the killed broker answers"

    def restart(self) -> None:
        self._broker.start_broker(self._node.node_id)


def test_the_broker_killed_mid_stream_and_restarted_loses_and_doubles_nothing(
    lone_broker: LocalStack, stack: StackEndpoints, unique_name: str, work_dir: Path
) -> None:
    run_through_broker_fault(
        kafka_bootstrap=lone_broker.endpoints.kafka_bootstrap,
        services=stack,
        name=unique_name,
        work_dir=work_dir,
        fault=KillTheBroker(lone_broker),
        lateness_ms=LATENESS_MS,
        seed=57,
    )
