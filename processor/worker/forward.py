"""The forward role: deliver the kept spans of the sampled topic to Phoenix, at Phoenix's pace.

``ForwardRole`` owns the bookkeeping of the sampled topic's partitions; it does no Kafka I/O,
so its rules are tested as tables. Its commit rule: an offset is safe once Phoenix has written
every span of every record before it (``SpanForwarder.pending_offset``), or refused them for
good and they are in the dead-letter topic. Phoenix down, slow or answering 503 only makes this
role lag: the aggregate role's commits do not wait for it.

A record this role never saw, because retention removed it before Phoenix came back, shows as
a gap in the offsets: those spans are lost, counted in ``lost_records`` and logged as an error.
``ForwardConsumer`` (``processor.worker.forward_consumer``) is the Kafka side.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from processor.errors import InvalidInput
from processor.worker.kept_spans import spans_of_record
from processor.worker.offsets import Commit, PartitionOffsets
from processor.worker.phoenix_delivery import SpanForwarder

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ForwardCounters:
    records: int = 0
    spans: int = 0
    bad_records: int = 0  # not an OTLP export request: a foreign writer or a bug
    skipped_records: int = 0  # read before a rebalance took the partition, or seen already
    lost_records: int = 0  # removed by retention before this role read them


class ForwardRole:
    """Hands each record's spans to the forwarder and says which offsets may be committed."""

    def __init__(self, forwarder: SpanForwarder) -> None:
        self.forwarder = forwarder
        self._offsets = PartitionOffsets(log, "forward")
        # partition -> offset -> record timestamp (ms) of the records with spans not settled:
        # the oldest of them says how long the oldest unforwarded span has waited.
        self._timestamps: dict[int, OrderedDict[int, int]] = {}
        self.counters = ForwardCounters()

    @property
    def assigned(self) -> frozenset[int]:
        return self._offsets.assigned

    def assign(self, partition: int, committed: int | None, log_start: int | None = None) -> None:
        """Take ``partition`` at the group's committed offset (None: no commit yet).

        ``log_start`` is the partition's first offset still in Kafka: a commit below it means
        retention removed records this role never forwarded."""
        # No commit yet: this group has forwarded nothing, so what retention took is lost too.
        if log_start is not None and (committed or 0) < log_start:
            self._lost(partition, committed or 0, log_start)
            committed = log_start
        self._offsets.assign(partition, committed)
        self._timestamps[partition] = OrderedDict()

    def revoke(self, partitions: Iterable[int]) -> None:
        revoked = list(partitions)
        self._offsets.revoke(revoked)
        for partition in revoked:
            self._timestamps.pop(partition, None)
        # Batches out complete; spans not sent yet are sent again by the next owner.
        self.forwarder.forget(revoked)

    async def handle(self, partition: int, offset: int, timestamp_ms: int, value: bytes) -> None:
        """One record of the sampled topic. May wait for a free request slot to Phoenix."""
        expected = self._offsets.next_offset(partition)
        if not self._offsets.accept(partition, offset):
            self.counters.skipped_records += 1
            return
        if expected is not None and offset > expected:
            self._lost(partition, expected, offset)
        counters = self.counters
        counters.records += 1
        try:
            spans = spans_of_record(value)
        except InvalidInput as exc:
            counters.bad_records += 1
            log.error(
                "ignoring record %d of sampled partition %d: %s", offset, partition, exc.detail
            )
            return
        if not spans:
            return
        counters.spans += len(spans)
        self._timestamps[partition][offset] = timestamp_ms
        await self.forwarder.add(spans, partition=partition, offset=offset)

    def tick(self) -> dict[int, Commit]:
        """The offset to commit per partition: every span before it is in Phoenix."""
        commits: dict[int, Commit] = {}
        for partition in sorted(self._offsets.assigned):
            safe = self._offsets.safe(partition, self.forwarder.pending_offset(partition))
            if safe is None:
                continue
            stamps = self._timestamps.get(partition)
            while stamps and next(iter(stamps)) < safe:
                stamps.popitem(last=False)
            commits[partition] = Commit(safe)
        return commits

    def oldest_pending_ms(self) -> int | None:
        """Record timestamp of the oldest record with a span not yet in Phoenix (None: none)."""
        oldest: int | None = None
        for partition, stamps in self._timestamps.items():
            pending = self.forwarder.pending_offset(partition)
            if pending is None:
                continue
            stamp = stamps.get(pending)
            if stamp is not None and (oldest is None or stamp < oldest):
                oldest = stamp
        return oldest

    def _lost(self, partition: int, first: int, after: int) -> None:
        self.counters.lost_records += after - first
        log.error(
            "sampled partition %d: records %d to %d were removed by retention before they "
            "reached Phoenix; their kept spans are lost (Phoenix was away longer than "
            "PROCESSOR_SAMPLED_RETENTION_MS)",
            partition,
            first,
            after - 1,
            extra={"partition": partition, "offset": first},
        )
