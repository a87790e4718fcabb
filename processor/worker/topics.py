"""Create the worker's topics, or check that existing ones have the expected partition counts.

Topics are created with the replication factor and ``min.insync.replicas`` of the settings, by
default those of `processor.replication` for the cluster's size: on three brokers or more each
partition has three replicas and a write (the worker produces with acks=all) is acknowledged
once two hold it, so one broker may go down without losing or refusing writes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from processor.errors import ConfigurationError, StackError
from processor.kafka_access import check_kafka_access
from processor.kafka_security import aiokafka_security_options
from processor.replication import min_insync_for, replication_for
from processor.settings import WorkerSettings

log = logging.getLogger(__name__)

_DESCRIBE_ATTEMPTS = 25
_DESCRIBE_PAUSE_S = 0.2


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


@dataclass(frozen=True, slots=True)
class Replication:
    """How the worker's topics are replicated on the cluster at hand."""

    factor: int
    min_insync: int

    @classmethod
    def resolve(cls, settings: WorkerSettings, brokers: int) -> Replication:
        """The settings' replication, or the defaults for ``brokers``; checked against both."""
        factor = settings.replication_factor or replication_for(brokers)
        min_insync = settings.min_insync_replicas or min_insync_for(factor)
        if factor > brokers:
            raise ConfigurationError(
                f"PROCESSOR_REPLICATION_FACTOR={factor} but the Kafka cluster at "
                f"{settings.kafka_bootstrap_servers} has {brokers} broker(s) up: Kafka cannot "
                "place that many replicas; lower it or start the brokers"
            )
        if min_insync > factor:
            raise ConfigurationError(
                f"PROCESSOR_MIN_INSYNC_REPLICAS={min_insync} exceeds the replication factor "
                f"{factor} (PROCESSOR_REPLICATION_FACTOR, or the cluster's {brokers} broker(s)): "
                "every write would be refused; lower it or raise the replication factor"
            )
        return cls(factor=factor, min_insync=min_insync)


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
        # Compacted, one live record per series and day: finalize reads its partitions whole
        # when it takes them over, so segments roll hourly and are cleaned early.
        TopicSpec(
            settings.summaries_topic,
            settings.partials_partitions,
            {
                "cleanup.policy": "compact",
                "segment.ms": str(3600 * 1000),
                "min.cleanable.dirty.ratio": "0.1",
                "delete.retention.ms": str(24 * 3600 * 1000),
            },
        ),
        # Alert events, keyed (rule, series, window): kept for two weeks like dead letters.
        TopicSpec(settings.alerts_topic, 1, {"retention.ms": str(14 * 24 * 3600 * 1000)}),
        # Kept spans wait here for Phoenix: retention is how long Phoenix may be away.
        TopicSpec(
            settings.sampled_topic,
            settings.sampled_partitions,
            {"retention.ms": str(settings.sampled_retention_ms)},
        ),
    ]


async def _create(
    admin: AIOKafkaAdminClient, specs: list[TopicSpec], replication: Replication
) -> None:
    response = await admin.create_topics(
        [
            NewTopic(
                spec.name,
                spec.partitions,
                replication.factor,
                topic_configs={
                    **spec.config,
                    # Set on the topic, not left to the broker's default: that may exceed the
                    # replication factor (every write refused) or be 1 on a cluster.
                    "min.insync.replicas": str(replication.min_insync),
                },
            )
            for spec in specs
        ]
    )
    for topic, error_code, *message in response.topic_errors:
        # Already exists: another worker won the race to create it.
        if error_code not in (0, TopicAlreadyExistsError.errno):
            detail = f" ({message[0]})" if message and message[0] else ""
            raise StackError(
                f"Kafka refused to create topic {topic!r}: {for_code(error_code).__name__}{detail}"
            )


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
    await check_kafka_access(settings)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=f"{settings.app_id}-admin",
        **aiokafka_security_options(settings),
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
            cluster = await admin.describe_cluster()
            replication = Replication.resolve(settings, len(cluster.get("brokers", [])))
            await _create(admin, missing, replication)
            log.info(
                "created topics %s with %d replica(s), min.insync.replicas=%d",
                ", ".join(spec.name for spec in missing),
                replication.factor,
                replication.min_insync,
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
