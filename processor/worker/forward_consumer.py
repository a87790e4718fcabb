"""The forward role's Kafka side: its own consumer group on the sampled topic.

The group is the forward role's alone (``WorkerSettings.forward_group_id``), so forwarders
scale with the sampled topic's partitions and their lag never rebalances or holds back the
aggregating workers. Offsets are committed only as ``ForwardRole.tick`` allows: once Phoenix
wrote the spans. While Phoenix is slow or down every request slot stays taken; the consumer
then pauses its partitions instead of blocking, so it keeps polling (a consumer that does not
poll for ``max_poll_interval_ms`` is thrown out of its group) and reads nothing it cannot send.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import mode
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from processor.kafka_security import aiokafka_security_options
from processor.settings import WorkerSettings
from processor.sinks.phoenix import ExportResult
from processor.worker.forward import ForwardRole
from processor.worker.observability import ConsumerPosition
from processor.worker.phoenix_delivery import ForwardedBatch

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 200
MAX_RECORDS_PER_POLL = 200
COMMIT_INTERVAL_S = 1.0


class RefusedBatches:
    """Writes the batches Phoenix refused for good to the dead-letter topic, with why."""

    def __init__(self, settings: WorkerSettings) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._settings.kafka_bootstrap_servers,
            client_id=f"{self._settings.app_id}-forward",
            acks="all",
            **aiokafka_security_options(self._settings),
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def __call__(self, batch: ForwardedBatch, result: ExportResult) -> None:
        # The batch's offsets count as done once this returns: wait for Kafka's acknowledgement.
        if self._producer is None:
            raise RuntimeError("the dead-letter producer is not started")
        await self._producer.send_and_wait(
            self._settings.dead_letter_topic,
            value=batch.to_request_bytes(),
            headers=[
                ("reason", b"phoenix_rejected"),
                ("detail", f"HTTP {result.status}: {result.detail}"[:1000].encode()),
                ("phoenix.project", batch.project.encode()),
                (
                    "source.messages",
                    ",".join(f"{p}:{o}" for p, o in batch.sources).encode(),
                ),
                ("source.topic", self._settings.sampled_topic.encode()),
            ],
        )


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, owner: ForwardConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._owner.revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self._owner.assigned(assigned)


class ForwardConsumer(mode.Service):
    """Reads the sampled topic into ``ForwardRole`` and commits what it says is safe."""

    def __init__(
        self,
        settings: WorkerSettings,
        role: ForwardRole,
        refused: RefusedBatches,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.role = role
        self._refused = refused
        self._consumer: AIOKafkaConsumer | None = None
        self._committed: dict[int, int] = {}
        self._paused = False
        # While paused the consumer fetches nothing, so its high watermarks stand still: the
        # lag is then read from the broker's end offsets instead.
        self._end_offsets: dict[int, int] = {}
        self.joined = False
        self.rebalancing = False
        self.commit_failures = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def on_start(self) -> None:
        await self._refused.start()
        # A rejected Phoenix API key stops the worker here, saying so.
        await self.role.forwarder.start(check_access=True)
        settings = self.settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            group_id=settings.forward_group_id,
            client_id=f"{settings.app_id}-forward",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 << 20,
            fetch_max_wait_ms=100,
            **aiokafka_security_options(settings),
        )
        consumer.subscribe([settings.sampled_topic], listener=_Rebalance(self))
        self._consumer = consumer  # the first assignment may come while it starts
        await consumer.start()

    async def on_started(self) -> None:
        self.add_future(self._consume())

    async def on_stop(self) -> None:
        consumer = self._consumer
        await self.role.forwarder.drain(self.settings.phoenix_drain_timeout_s)
        if consumer is not None:
            await self._commit()
            await consumer.stop()
            self._consumer = None
        await self._refused.stop()

    # -- the loop --------------------------------------------------------------------------

    async def _consume(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        last_commit = time.monotonic()
        while not self.should_stop:
            self._pause_while_full(consumer)
            try:
                batches = await consumer.getmany(
                    timeout_ms=POLL_TIMEOUT_MS, max_records=MAX_RECORDS_PER_POLL
                )
            except KafkaError as exc:  # the broker away: aiokafka reconnects by itself
                log.debug("forward poll failed: %r", exc)
                await asyncio.sleep(POLL_TIMEOUT_MS / 1000)
                continue
            saturated = False
            for tp, records in batches.items():
                for record in records:
                    saturated = saturated or self.role.forwarder.saturated
                    if saturated:
                        # Read again once a slot is free: handed over now, it would wait in
                        # ``add``, and with it the polls, the commits and the lag readings.
                        consumer.seek(tp, record.offset)
                        break
                    await self.role.handle(
                        tp.partition, record.offset, record.timestamp, record.value or b""
                    )
            if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                last_commit = time.monotonic()
                await self._commit()
                if self._paused:
                    await self._refresh_end_offsets(consumer)

    def _pause_while_full(self, consumer: AIOKafkaConsumer) -> None:
        full = self.role.forwarder.saturated
        if full == self._paused:
            return
        assignment = consumer.assignment()
        if full:
            consumer.pause(*assignment)
        else:
            consumer.resume(*assignment)
        self._paused = full

    async def _refresh_end_offsets(self, consumer: AIOKafkaConsumer) -> None:
        assignment = list(consumer.assignment())
        if not assignment:
            return
        try:
            ends = await consumer.end_offsets(assignment)
        except KafkaError as exc:
            log.debug("could not read the sampled topic's end offsets: %r", exc)
            return
        self._end_offsets = {tp.partition: offset for tp, offset in ends.items()}

    async def _commit(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        topic = self.settings.sampled_topic
        due = {
            TopicPartition(topic, partition): OffsetAndMetadata(commit.offset, "")
            for partition, commit in self.role.tick().items()
            if commit.offset > self._committed.get(partition, -1)
        }
        if not due:
            return
        try:
            await consumer.commit(due)
        except KafkaError as exc:  # tried again at the next interval
            self.commit_failures += 1
            log.warning("forward offset commit failed, will retry: %r", exc)
            return
        for tp, meta in due.items():
            self._committed[tp.partition] = meta.offset

    # -- rebalances ------------------------------------------------------------------------

    async def revoked(self, revoked: list[TopicPartition]) -> None:
        self.rebalancing = True
        await self._commit()  # what Phoenix has written need not be sent again
        partitions = [tp.partition for tp in revoked]
        self.role.revoke(partitions)
        for partition in partitions:
            self._committed.pop(partition, None)
            self._end_offsets.pop(partition, None)

    async def assigned(self, assigned: list[TopicPartition]) -> None:
        consumer = self._consumer
        assert consumer is not None
        starts: dict[TopicPartition, int] = {}
        if assigned:
            starts = await consumer.beginning_offsets(assigned)
        for tp in assigned:
            committed = await consumer.committed(tp)
            self.role.assign(tp.partition, committed, starts.get(tp))
            if committed is not None:
                self._committed[tp.partition] = committed
        self._paused = False  # a new assignment starts unpaused
        self.joined = True
        self.rebalancing = False

    # -- what observability reads ----------------------------------------------------------

    def positions(self) -> list[ConsumerPosition]:
        consumer = self._consumer
        if consumer is None:
            return []
        found: list[ConsumerPosition] = []
        topic = self.settings.sampled_topic
        for partition in sorted(self.role.assigned):
            tp = TopicPartition(topic, partition)
            try:
                highwater = consumer.highwater(tp)
            except Exception:  # just revoked
                highwater = None
            end = self._end_offsets.get(partition)
            if end is not None and (highwater is None or end > highwater):
                highwater = end
            found.append(
                ConsumerPosition(topic, partition, highwater, self._committed.get(partition))
            )
        return found
