"""Read finalize's state back from the compacted summaries topic when it takes partitions over.

The topic holds, per series and day, the latest ``SeriesDay`` finalize saved, and per series
the states of its alert rules (``SeriesAlerts``): older versions until compaction removes
them, a tombstone once a day is over. Reading a partition from its beginning to its end and
keeping the last record of each key gives the state its previous owner had saved when it last
committed, or later: folds and alert evaluations are idempotent by window step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from processor.core.alerts import ALERTS_KIND, SeriesAlerts
from processor.core.calendar import SUMMARY_KIND, SeriesDay
from processor.kafka_security import aiokafka_security_options
from processor.settings import KafkaClientSettings

log = logging.getLogger(__name__)

FETCH_TIMEOUT_MS = 1_000


Summary = SeriesDay | SeriesAlerts


async def read_summaries(
    settings: KafkaClientSettings, topic: str, partitions: Iterable[int]
) -> dict[int, list[Summary]]:
    """The live days and alert states of each partition of ``topic``."""
    wanted = [TopicPartition(topic, partition) for partition in sorted(set(partitions))]
    if not wanted:
        return {}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **aiokafka_security_options(settings),
    )
    await consumer.start()
    try:
        consumer.assign(wanted)
        ends = await consumer.end_offsets(wanted)
        await consumer.seek_to_beginning(*wanted)
        latest: dict[TopicPartition, dict[bytes, bytes | None]] = {tp: {} for tp in wanted}
        remaining = {tp for tp in wanted if ends[tp] > await consumer.position(tp)}
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=FETCH_TIMEOUT_MS)
            for tp, records in batches.items():
                for record in records:
                    if record.key is not None:
                        latest[tp][record.key] = record.value
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    summaries: dict[int, list[Summary]] = {}
    for tp, values in latest.items():
        found = summaries.setdefault(tp.partition, [])
        for value in values.values():
            if value is None:
                continue  # deleted: the day is over
            try:
                found.append(parse_summary(value))
            except ValueError as exc:
                # Only finalize writes this topic: a bad record is a bug or a foreign writer.
                log.error("ignoring a record of %s that is not ours: %s", topic, exc)
    return summaries


def parse_summary(value: bytes) -> Summary:
    kind = orjson.loads(value).get("kind") if value.startswith(b"{") else None
    if kind == SUMMARY_KIND:
        return SeriesDay.from_bytes(value)
    if kind == ALERTS_KIND:
        return SeriesAlerts.from_document(orjson.loads(value))
    raise ValueError(f"unknown summary kind {kind!r}")
