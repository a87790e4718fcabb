"""Rewinding the consumer to the committed offsets, against a real Kafka broker.

faust drops the records it fetched while its flow was stopped (a rebalance in progress) and
rewinds to the committed offsets to read them again. A partition with no commit yet must go
back to its beginning; left where it was, the dropped records were never read, and a stage-2
partition resumed mid-topic with windows short of spans.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from processor.stack import StackEndpoints
from processor.worker.commits import seek_to_committed

MESSAGES_PER_PARTITION = 5
READ_TIMEOUT_S = 30.0


def test_a_partition_without_a_commit_goes_back_to_its_beginning(
    stack: StackEndpoints, unique_name: str
) -> None:
    reread = asyncio.run(_read_commit_rewind_reread(stack.kafka_bootstrap, unique_name))

    # Partition 0 has no commit: all of it again. Partition 1 was committed at 3: from there.
    assert reread == {0: [0, 1, 2, 3, 4], 1: [3, 4]}


async def _read_commit_rewind_reread(bootstrap: str, name: str) -> dict[int, list[int]]:
    topic = f"{name}.rewind"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for partition in (0, 1):
            for i in range(MESSAGES_PER_PARTITION):
                await producer.send_and_wait(topic, f"{i}".encode(), partition=partition)
    finally:
        await producer.stop()

    # Group-managed and without auto commits, as the worker's consumer is.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=name,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    consumer.subscribe([topic])
    await consumer.start()
    try:
        first = await _read(consumer, 2 * MESSAGES_PER_PARTITION)
        assert first == {p: list(range(MESSAGES_PER_PARTITION)) for p in (0, 1)}
        await consumer.commit({TopicPartition(topic, 1): 3})

        committed = await seek_to_committed(consumer)

        assert committed == {TopicPartition(topic, 0): None, TopicPartition(topic, 1): 3}
        return await _read(consumer, MESSAGES_PER_PARTITION + 2)
    finally:
        await consumer.stop()


async def _read(consumer: AIOKafkaConsumer, count: int) -> dict[int, list[int]]:
    """The offsets read per partition: ``count`` records, or what came within the timeout."""
    offsets: dict[int, list[int]] = {}
    read = 0
    deadline = time.monotonic() + READ_TIMEOUT_S
    while read < count and time.monotonic() < deadline:
        for tp, records in (await consumer.getmany(timeout_ms=500)).items():
            offsets.setdefault(tp.partition, []).extend(r.offset for r in records)
            read += len(records)
    return offsets
