"""Which Kafka node does what for a topic or a group, as the cluster's metadata says.

What a test needs to pick the broker whose loss hurts most: the node leading the most partitions
of a topic (its producers and consumers all move), or a group's coordinator (its commits and
heartbeats move).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, for_code

from processor.errors import StackError

_CLIENT_ID = "trace-processor-stack"
NO_LEADER = -1
_RETRY_PAUSE_S = 0.5


async def partition_leaders(bootstrap: str, topic: str) -> dict[int, int]:
    """``{partition: leader node id}`` of ``topic``; -1 for a partition without a leader."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id=_CLIENT_ID)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if described["error_code"]:
        raise StackError(
            f"Kafka cannot describe topic {topic!r}: {for_code(described['error_code']).__name__}"
        )
    return {entry["partition"]: entry["leader"] for entry in described["partitions"]}


def busiest_leader(leaders: Mapping[int, int]) -> int:
    """The node leading the most partitions (the lowest id of those tied)."""
    counts = Counter(leader for leader in leaders.values() if leader != NO_LEADER)
    if not counts:
        raise StackError("no partition has a leader")
    return min(counts, key=lambda node_id: (-counts[node_id], node_id))


async def group_coordinator(bootstrap: str, group_id: str, *, timeout_s: float = 60.0) -> int:
    """The node id of the consumer group's coordinator.

    The cluster's first question about any group makes it create the group offsets topic, and
    it answers "not available" until that is done: asked again, as every client does."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id=_CLIENT_ID)
    await admin.start()
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    return await admin.find_coordinator(group_id)
                except KafkaError as exc:
                    if not exc.retriable:
                        raise
                await asyncio.sleep(_RETRY_PAUSE_S)
    finally:
        await admin.close()
