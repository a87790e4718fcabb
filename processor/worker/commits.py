"""Offset commits that carry a checkpoint, and manual acks up to a safe offset.

Faust commits the highest contiguous offset its streams have acknowledged. The worker's
streams do not acknowledge a message when they have read it, but only once everything it
carried is out (in a written partial, in a Phoenix batch Phoenix accepted, or in MLflow):
``CommitLedger.release`` acks the held events below the safe offset. The checkpoint that a
replay from that offset needs travels in the commit itself, as Kafka's per-partition commit
metadata, so offset and state are stored in one atomic write: no transactions, no second
store to keep in step.

The consumer thread also rewinds with ``seek_to_committed`` below, which, unlike aiokafka's,
sends a partition with no commit back to its beginning, and keeps faust's livelock check off
the partitions such a rewind left without a position. Its consumer fetches with a shorter
wait than faust's (``FETCH_MAX_WAIT_MS``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from time import monotonic
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import OffsetAndMetadata
from aiokafka.structs import TopicPartition as KafkaTopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, EventT

from processor.kafka_security import aiokafka_security_options
from processor.settings import KafkaClientSettings

log = logging.getLogger(__name__)

MAX_METADATA_BYTES = 4096  # the broker's default offset.metadata.max.bytes
# How long the broker may hold a fetch that finds no new data. aiokafka has one fetch in
# flight per broker, and leaves a partition out of it while records fetched before are still
# unread; faust sets 1,500 ms. A fetch that asks only for quiet partitions (the partials
# topic, say) then keeps the busy ones waiting that long once their records are read: two
# workers on a backlog stalled for a second at a time and together ran at 1.4x one worker.
FETCH_MAX_WAIT_MS = 100


class CommitLedger:
    """Held (unacknowledged) events per partition and the metadata of each safe offset."""

    # Faust computes the offset to commit on the event loop and commits it from its consumer
    # thread, while the loop may already have released a later offset: the metadata of a
    # few recent offsets is kept so the one being committed is always found.
    RECENT_OFFSETS = 256

    def __init__(self) -> None:
        self._held: dict[TP, deque[tuple[int, EventT]]] = {}
        self._metadata: dict[TP, OrderedDict[int, str]] = {}

    def hold(self, tp: TP, offset: int, event: EventT) -> None:
        self._held.setdefault(tp, deque()).append((offset, event))

    def release(self, tp: TP, safe_offset: int, metadata: str = "") -> int:
        """Ack every held event below ``safe_offset``; remember ``metadata`` for that offset."""
        if len(metadata.encode()) > MAX_METADATA_BYTES:
            raise ValueError(f"commit metadata over {MAX_METADATA_BYTES} bytes: {metadata[:80]}")
        recent = self._metadata.setdefault(tp, OrderedDict())
        if recent and next(reversed(recent)) > safe_offset:
            return 0  # never move back: the later offset may be committed already
        recent[safe_offset] = metadata
        while len(recent) > self.RECENT_OFFSETS:
            recent.popitem(last=False)
        held = self._held.get(tp)
        released = 0
        while held and held[0][0] < safe_offset:
            _, event = held.popleft()
            event.ack()
            released += 1
        return released

    def metadata_for(self, tp: TP, offset: int) -> str:
        recent = self._metadata.get(tp)
        if recent is None:
            return ""  # not a topic of ours (faust's own), or nothing released yet
        metadata = recent.get(offset)
        if metadata is None:
            # Only offsets the ledger released are ever acknowledged, so this is a bug.
            log.error("no checkpoint for %s at offset %d: committing without one", tp, offset)
            return ""
        return metadata

    def forget(self, tps: Iterable[TP]) -> None:
        # The next owner re-reads these messages from the committed offset.
        for tp in tps:
            self._held.pop(tp, None)
            self._metadata.pop(tp, None)

    def held_count(self, tp: TP) -> int:
        held = self._held.get(tp)
        return len(held) if held else 0


async def seek_to_committed(consumer: AIOKafkaConsumer) -> dict[KafkaTopicPartition, int | None]:
    """Move every assigned partition back to its committed offset, or to its beginning.

    faust rewinds with this when it drops records it fetched while its flow was stopped (a
    rebalance in progress). aiokafka's own ``seek_to_committed`` leaves a partition with no
    commit where it is, past the dropped records, which were then never read: a finalize
    partition resumed mid-topic after a rebalance and its windows came out short. A
    partition with no commit starts at its beginning, as ``auto_offset_reset=earliest`` says.
    """
    committed: dict[KafkaTopicPartition, int | None] = await consumer.seek_to_committed()
    uncommitted = [tp for tp, offset in committed.items() if not offset]
    if uncommitted:
        await consumer.seek_to_beginning(*uncommitted)
    return committed


def has_position(consumer: AIOKafkaConsumer, tp: TP) -> bool:
    """Whether ``tp`` is assigned to ``consumer`` with a known fetch position."""
    subscription = consumer._subscription.subscription
    assigned = subscription.assignment if subscription is not None else None
    if assigned is None:
        return False
    state = assigned.state_value(KafkaTopicPartition(tp.topic, tp.partition))
    return state is not None and state.has_valid_position


class _CheckpointingConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> AIOKafkaConsumer:
        consumer: AIOKafkaConsumer = super()._create_worker_consumer(transport)
        # faust passes a fixed fetch_max_wait_ms; set before start(), it reaches the fetcher.
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer

    async def seek_to_committed(self) -> Mapping[TP, int]:
        # Keyed by aiokafka's TopicPartition, a named tuple like faust's TP; faust converts.
        committed: Any = await self.call_thread(seek_to_committed, self._ensure_consumer())
        return committed

    def verify_event_path(self, now: float, tp: TP) -> None:
        # faust's livelock check (every few seconds; it only logs) reads each partition's
        # position, and aiokafka asserts that the position is known. While seek_to_committed
        # above sends a partition back to its beginning, it has none until the broker answers,
        # and the failed assertion crashed the whole worker (a third worker joining
        # mid-stream, in CI). Such a partition is not stuck, so the check passes over it. The
        # rewind runs on the consumer thread and this on the event loop, so it can also start
        # between the two reads: hence the except as well.
        if not has_position(self._ensure_consumer(), tp):
            return None
        try:
            super().verify_event_path(now, tp)
        except AssertionError:
            log.debug("livelock check passed over %s: it is being rewound", tp)
        return None

    async def _commit(self, offsets: Mapping[TP, int]) -> bool:
        ledger: CommitLedger | None = getattr(self.app, "commit_ledger", None)
        if ledger is None:
            return await super()._commit(offsets)
        consumer = self._ensure_consumer()
        assignment = self.assignment()
        with_metadata = {
            KafkaTopicPartition(tp.topic, tp.partition): OffsetAndMetadata(
                offset, ledger.metadata_for(tp, offset)
            )
            for tp, offset in offsets.items()
            if tp in assignment
        }
        if not with_metadata:
            return False
        try:
            await consumer.commit(with_metadata)
        except Exception as exc:  # faust's own _commit treats every failure as "not committed"
            log.warning("offset commit failed, will retry: %r", exc)
            return False
        # faust's stuck-consumer check reads this; without it, it logs "Has not committed ...
        # at all since worker start" as an ERROR every few minutes for committed partitions.
        now = monotonic()
        self.tp_last_committed_at.update({tp: now for tp in offsets if tp in assignment})
        return True


class _CheckpointingConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _CheckpointingConsumerThread(self, loop=self.loop, beacon=self.beacon)


class CheckpointingTransport(faust_aiokafka.Transport):
    """faust's aiokafka transport, committing with the ledger's metadata."""

    Consumer = _CheckpointingConsumer


async def committed_metadata(
    settings: KafkaClientSettings, group_id: str, tps: Iterable[TP]
) -> dict[TP, tuple[int, str]]:
    """The committed offset and metadata of each partition that has a commit."""
    wanted = [KafkaTopicPartition(tp.topic, tp.partition) for tp in tps]
    if not wanted:
        return {}
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap_servers, **aiokafka_security_options(settings)
    )
    await admin.start()
    try:
        found: Any = await admin.list_consumer_group_offsets(group_id, partitions=wanted)
    finally:
        await admin.close()
    return {
        TP(tp.topic, tp.partition): (meta.offset, meta.metadata or "")
        for tp, meta in found.items()
        if meta is not None and meta.offset >= 0
    }
