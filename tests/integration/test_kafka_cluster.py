"""On a 3-broker Kafka cluster, one broker may die mid-stream: nothing is lost or counted twice.

The cluster is the local stack's (`trace-processor stack up --brokers 3`): three KRaft nodes,
each a broker and a voter, internal topics with 3 replicas, ``min.insync.replicas`` 2. The
worker's topics get the same from the worker itself. With producers on acks=all, a write is
acknowledged once two brokers hold it, so killing any one broker (SIGKILL: no clean shutdown,
no leadership handed over) loses no acknowledged write, and the two left keep taking writes.

Each test runs live traffic through a worker process (every role), kills one broker while it
runs, checks that the cluster kept working without it, starts it again, and then compares
MLflow with the truth and Phoenix with the kept spans (tests/integration/broker_faults.py):

- the coordinator of the worker's consumer group: its commits, heartbeats and joins move;
- the broker leading the most partitions of the spans topic: most of the reading and writing
  moves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from processor.loadgen import ensure_topic
from processor.settings import load_worker_settings
from processor.stack import LocalStack, StackEndpoints
from processor.stack.kafka_leaders import (
    NO_LEADER,
    busiest_leader,
    group_coordinator,
    partition_leaders,
)
from processor.worker.topics import ensure_topics
from tests.integration.broker_faults import (
    Traffic,
    end_offsets,
    run_through_broker_fault,
    wait_for_more_records,
)
from tests.integration.support import poll_until

pytestmark = pytest.mark.integration

# Covers the outage of the partitions the killed broker led: the cluster notices the loss
# after broker.session.timeout.ms (9 s) and elects new leaders, and clients find them.
LATENESS_MS = 30_000


async def _replication(bootstrap: str, topics: list[str]) -> dict[str, tuple[set[int], str]]:
    """{topic: (replica counts of its partitions, its min.insync.replicas)}."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
        responses = await admin.describe_configs(
            [
                ConfigResource(ConfigResourceType.TOPIC, topic, {"min.insync.replicas": None})
                for topic in topics
            ]
        )
    finally:
        await admin.close()
    min_insync = {
        resource[3]: value
        for response in responses
        for resource in response.resources
        for name, value, *_ in resource[4]
        if name == "min.insync.replicas"
    }
    return {
        entry["topic"]: (
            {len(p["replicas"]) for p in entry["partitions"]},
            min_insync[entry["topic"]],
        )
        for entry in described
    }


def test_topics_on_the_cluster_have_three_replicas_two_in_sync(
    kafka_cluster: LocalStack, unique_name: str
) -> None:
    bootstrap = kafka_cluster.endpoints.kafka_bootstrap
    assert bootstrap.count(",") == 2, bootstrap
    # As a worker creates its topics at start-up, with the default replication settings.
    settings = load_worker_settings(
        kafka_bootstrap_servers=bootstrap,
        app_id=unique_name,
        spans_topic=f"{unique_name}.spans",
        dead_letter_topic=f"{unique_name}.dlq",
        partials_topic=f"{unique_name}.partials",
        summaries_topic=f"{unique_name}.summaries",
        alerts_topic=f"{unique_name}.alerts",
        sampled_topic=f"{unique_name}.sampled",
    )
    counts = asyncio.run(ensure_topics(settings))
    loadgen_topic = f"{unique_name}.loadgen"
    assert asyncio.run(ensure_topic(bootstrap=bootstrap, topic=loadgen_topic, partitions=2))
    # The group offsets topic is made on a group's first use.
    asyncio.run(group_coordinator(bootstrap, unique_name))

    topics = [*counts, loadgen_topic]

    def described() -> dict[str, tuple[set[int], str]] | None:
        # A topic created a moment ago may describe with no partitions until the brokers'
        # metadata catches up (as topics.ensure_topics allows for too).
        found = asyncio.run(_replication(bootstrap, topics))
        return found if all(found[topic][0] for topic in topics) else None

    replication = poll_until(described, timeout_s=30, what="the new topics' partitions")
    assert replication == {topic: ({3}, "2") for topic in topics}
    offsets = asyncio.run(_replication(bootstrap, ["__consumer_offsets"]))
    assert offsets["__consumer_offsets"][0] == {3}


def _leaders(bootstrap: str, topic: str) -> dict[int, int] | None:
    """The partition leaders of ``topic``; None while the cluster cannot say (just after a
    kill, a client may still try the dead node)."""
    try:
        return asyncio.run(partition_leaders(bootstrap, topic))
    except KafkaError:
        return None


class KillOneNode:
    """Kill the node ``choose`` names, check that the two left carry on, start it again."""

    def __init__(self, cluster: LocalStack, choose: Callable[[str, dict[str, str]], int]) -> None:
        self._cluster = cluster
        self._choose = choose
        self.node_id: int | None = None

    @property
    def _bootstrap(self) -> str:
        return self._cluster.endpoints.kafka_bootstrap

    def kill(self, env: dict[str, str]) -> None:
        self.node_id = self._choose(self._bootstrap, env)
        self._cluster.kill_broker(self.node_id)

    def while_down(self, env: dict[str, str], traffic: Traffic) -> None:
        node_id = self.node_id
        spans_topic, sampled_topic = env["PROCESSOR_SPANS_TOPIC"], env["PROCESSOR_SAMPLED_TOPIC"]

        def led_by_the_others() -> dict[int, int] | None:
            leaders = _leaders(self._bootstrap, spans_topic)
            if leaders is None or any(
                leader in (node_id, NO_LEADER) for leader in leaders.values()
            ):
                return None
            return leaders

        poll_until(
            led_by_the_others,
            timeout_s=120,
            what=f"the partitions node {node_id} led to have leaders among the others",
        )
        # acks=all with two of three in sync: both producers' writes are acknowledged.
        for topic, whose in (
            (spans_topic, "the load generator's"),
            (sampled_topic, "the worker's"),
        ):
            written = sum(end_offsets(self._bootstrap, topic).values())
            wait_for_more_records(
                self._bootstrap,
                topic,
                more_than=written,
                what=f"{whose} records in {topic} with node {node_id} down",
            )
        assert not self._cluster.status()[f"kafka-{node_id}"].running, "it came back by itself"

    def restart(self) -> None:
        assert self.node_id is not None
        self._cluster.start_broker(self.node_id)


def _group_coordinator(bootstrap: str, env: dict[str, str]) -> int:
    return asyncio.run(group_coordinator(bootstrap, env["PROCESSOR_APP_ID"]))


def _busiest_leader(bootstrap: str, env: dict[str, str]) -> int:
    return busiest_leader(asyncio.run(partition_leaders(bootstrap, env["PROCESSOR_SPANS_TOPIC"])))


@pytest.mark.parametrize(
    ("victim", "seed"),
    [
        # the coordinator of the worker's aggregating consumer group
        pytest.param(_group_coordinator, 51, id="group-coordinator"),
        # the broker that leads the most partitions of the spans topic
        pytest.param(_busiest_leader, 53, id="busiest-leader"),
    ],
)
def test_a_broker_killed_mid_stream_and_restarted_loses_and_doubles_nothing(
    kafka_cluster: LocalStack,
    stack: StackEndpoints,
    unique_name: str,
    work_dir: Path,
    victim: Callable[[str, dict[str, str]], int],
    seed: int,
) -> None:
    fault = KillOneNode(kafka_cluster, victim)

    run = run_through_broker_fault(
        kafka_bootstrap=kafka_cluster.endpoints.kafka_bootstrap,
        services=stack,
        name=unique_name,
        work_dir=work_dir,
        fault=fault,
        lateness_ms=LATENESS_MS,
        seed=seed,
    )

    assert fault.node_id is not None
    _assert_replicated(kafka_cluster, run.env)


def _assert_replicated(cluster: LocalStack, env: dict[str, str]) -> None:
    """The worker created its topics with three replicas, two in sync, and the restarted broker
    has caught up: every replica is in sync again."""
    bootstrap = cluster.endpoints.kafka_bootstrap
    topics = [env[f"PROCESSOR_{role}_TOPIC"] for role in ("SPANS", "PARTIALS", "SAMPLED")]
    replication = asyncio.run(_replication(bootstrap, topics))
    assert replication == {topic: ({3}, "2") for topic in topics}

    def all_in_sync() -> bool | None:
        in_sync = asyncio.run(_in_sync_counts(bootstrap, topics))
        return True if in_sync == {3} else None

    poll_until(all_in_sync, timeout_s=120, what="every replica in sync again")


async def _in_sync_counts(bootstrap: str, topics: list[str]) -> set[int]:
    """How many replicas are in sync, over every partition of ``topics``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return {len(p["isr"]) for entry in described for p in entry["partitions"]}
