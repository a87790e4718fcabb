"""Rewinding the consumer to the committed offsets, against a real Kafka broker.

faust drops the records it fetched while its flow was stopped (a rebalance in progress) and
rewinds to the committed offsets to read them again. A partition with no commit yet must go
back to its beginning; left where it was, the dropped records were never read, and a finalize
partition resumed mid-topic with windows short of spans.

While a partition is being sent back, it has no position, and faust's periodic livelock check
must pass over it rather than trip aiokafka's assertion, which crashed a worker.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition
from faust.types import TP

from processor.stack import StackEndpoints
from processor.worker.app import ProcessorApp
from processor.worker.commits import has_position, seek_to_committed

MESSAGES_PER_PARTITION = 5
READ_TIMEOUT_S = 30.0


def test_a_partition_without_a_commit_goes_back_to_its_beginning(
    stack: StackEndpoints, unique_name: str
) -> None:
    reread = asyncio.run(_read_commit_rewind_reread(stack.kafka_bootstrap, unique_name))

    # Partition 0 has no commit: all of it again. Partition 1 was committed at 3: from there.
    assert reread == {0: [0, 1, 2, 3, 4], 1: [3, 4]}


def test_the_livelock_check_passes_over_a_partition_being_rewound(
    stack: StackEndpoints, unique_name: str
) -> None:
    asyncio.run(_check_while_rewinding(stack.kafka_bootstrap, unique_name))


async def _check_while_rewinding(bootstrap: str, name: str) -> None:
    topic = f"{name}.rewind"
    await _create_and_fill(bootstrap, topic)
    consumer = await _start_consumer(bootstrap, name, topic)
    try:
        assert await _read(consumer, 2 * MESSAGES_PER_PARTITION)
        # The worker's own consumer thread (faust's, with the checkpointing overrides), over a
        # consumer in the state a rebalance leaves it in: fetched, then sent back.
        thread = ProcessorApp(name, broker=f"kafka://{bootstrap}").consumer._thread
        thread._consumer = consumer
        thread.time_started = time.monotonic()
        partition = TP(topic, 0)

        rewind = asyncio.ensure_future(consumer.seek_to_beginning(TopicPartition(topic, 0)))
        await asyncio.sleep(0)  # the reset is asked for; the broker has not answered yet
        assert not has_position(consumer, partition)
        thread.verify_event_path(time.monotonic(), partition)  # raised AssertionError before

        await rewind
        assert has_position(consumer, partition)
        thread.verify_event_path(time.monotonic(), partition)
        assert await consumer.position(TopicPartition(topic, 0)) == 0
    finally:
        await consumer.stop()


async def _create_and_fill(bootstrap: str, topic: str) -> None:
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


async def _read_commit_rewind_reread(bootstrap: str, name: str) -> dict[int, list[int]]:
    topic = f"{name}.rewind"
    await _create_and_fill(bootstrap, topic)

    consumer = await _start_consumer(bootstrap, name, topic)
    try:
        first = await _read(consumer, 2 * MESSAGES_PER_PARTITION)
        assert first == {p: list(range(MESSAGES_PER_PARTITION)) for p in (0, 1)}
        await consumer.commit({TopicPartition(topic, 1): 3})

        committed = await seek_to_committed(consumer)

        assert committed == {TopicPartition(topic, 0): None, TopicPartition(topic, 1): 3}
        return await _read(consumer, MESSAGES_PER_PARTITION + 2)
    finally:
        await consumer.stop()


async def _start_consumer(bootstrap: str, name: str, topic: str) -> AIOKafkaConsumer:
    # Group-managed and without auto commits, as the worker's consumer is.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=name,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    consumer.subscribe([topic])
    await consumer.start()
    return consumer


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
