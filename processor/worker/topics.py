"""Create the worker's topics, or check that existing ones have the expected partition counts."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from processor.errors import ConfigurationError, StackError
from processor.settings import WorkerSettings

_DESCRIBE_ATTEMPTS = 25
_DESCRIBE_PAUSE_S = 0.2


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def topic_specs(settings: WorkerSettings) -> list[TopicSpec]:
    repartition = (
        [TopicSpec(settings.aggregate_topic, settings.spans_partitions, {})]
        if settings.repartition_by_trace_id
        else []
    )
    return [
        TopicSpec(settings.spans_topic, settings.spans_partitions, {}),
        *repartition,
        TopicSpec(settings.dead_letter_topic, 1, {"retention.ms": str(14 * 24 * 3600 * 1000)}),
        # Compacted: a replayed partial replaces its twin, keyed (agent, window, partition).
        TopicSpec(
            settings.partials_topic,
            settings.partials_partitions,
            {"cleanup.policy": "compact", "min.compaction.lag.ms": str(3600 * 1000)},
        ),
        # Kept spans wait here for Phoenix: retention is how long Phoenix may be away.
        TopicSpec(
            settings.sampled_topic,
            settings.sampled_partitions,
            {"retention.ms": str(settings.sampled_retention_ms)},
        ),
    ]


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    # A topic created a moment ago may describe with no partitions until the broker's metadata
    # catches up: ask again for a few seconds before believing it.
    for _ in range(_DESCRIBE_ATTEMPTS):
        described = await admin.describe_topics(names)
        counts = {entry["topic"]: len(entry["partitions"]) for entry in described}
        if all(counts.get(name) for name in names):
            break
        await asyncio.sleep(_DESCRIBE_PAUSE_S)
    return counts


async def ensure_topics(settings: WorkerSettings) -> dict[str, int]:
    """Create missing topics; return each topic's partition count.

    A partition count that differs from the settings stops start-up: trace ids would hash to
    other partitions than the running workers expect.
    """
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap_servers, client_id=f"{settings.app_id}-admin"
    )
    try:
        await admin.start()
    except KafkaError as exc:
        raise StackError(
            f"cannot reach Kafka at {settings.kafka_bootstrap_servers} ({exc}); "
            "start it (`trace-processor stack up`) or set KAFKA_BOOTSTRAP_SERVERS"
        ) from exc
    try:
        specs = topic_specs(settings)
        existing = set(await admin.list_topics())
        missing = [spec for spec in specs if spec.name not in existing]
        if missing:
            # another worker may win the race to create them
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [
                        NewTopic(
                            spec.name,
                            spec.partitions,
                            settings.replication_factor,
                            topic_configs=spec.config,
                        )
                        for spec in missing
                    ]
                )
        counts = await _partition_counts(admin, [spec.name for spec in specs])
        for spec in specs:
            actual = counts.get(spec.name)
            if spec.name == settings.dead_letter_topic:
                continue
            if actual != spec.partitions:
                raise ConfigurationError(
                    f"topic {spec.name!r} has {actual} partitions but the settings say "
                    f"{spec.partitions}; set the matching PROCESSOR_*_PARTITIONS or recreate "
                    "the topic"
                )
        return counts
    finally:
        await admin.close()
