"""Stage 2 adapter: merge partials per stage-2 partition and write final windows to MLflow."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

from processor.clock import Clock
from processor.core.merge import RollupMerger
from processor.core.rollup import FinalRollup, PartitionProgress, parse_stage_record
from processor.errors import RetryableExportError
from processor.sinks.mlflow_writer import RollupWriter
from processor.worker.assignment import ResumeWatch

log = logging.getLogger(__name__)

RECENT_WINDOWS = 50


@dataclass(frozen=True, slots=True)
class WrittenWindow:
    """A final window MLflow took: what `trace-processor status` lists."""

    agent: str
    window_start_ms: int
    window_end_ms: int
    written_at_ms: int
    spans: int
    errors: int


class Stage2:
    def __init__(
        self,
        *,
        source_partitions: int,
        max_wait_ms: int,
        writer: RollupWriter,
        clock: Clock,
        retry_base_s: float = 1.0,
        retry_max_s: float = 30.0,
    ) -> None:
        self._source_partitions = source_partitions
        self._max_wait_ms = max_wait_ms
        self._writer = writer
        self._clock = clock
        self._retry_base_s = retry_base_s
        self._retry_max_s = retry_max_s
        self.mergers: dict[int, RollupMerger] = {}
        self._next_offset: dict[int, int] = {}
        # The partials topic is compacted: its first record need not be at the commit.
        self._resume = ResumeWatch(log, stage=2, compacted=True)
        self.windows_written = 0
        self.write_retries = 0
        self.bad_records = 0
        # Wall clock at write time minus window end, summed over every window written.
        self.freshness_ms_sum = 0
        self.recent_windows: deque[WrittenWindow] = deque(maxlen=RECENT_WINDOWS)

    def assign(
        self, partition: int, finalized_until_ms: int | None, committed: int | None = None
    ) -> None:
        merger = self._merger(partition)
        merger.finalized_until_ms = finalized_until_ms
        self._resume.expect(partition, committed)

    def revoke_all(self) -> None:
        self.mergers.clear()
        self._next_offset.clear()
        self._resume.clear()

    def _merger(self, partition: int) -> RollupMerger:
        merger = self.mergers.get(partition)
        if merger is None:
            merger = self.mergers[partition] = RollupMerger(
                source_partitions=self._source_partitions, max_wait_ms=self._max_wait_ms
            )
        return merger

    def handle(self, partition: int, offset: int, value: bytes) -> None:
        expected = self._next_offset.get(partition)
        if partition not in self.mergers or (expected is not None and offset < expected):
            return  # read before a rebalance took the partition away, or already seen
        self._resume.handled(partition, offset)
        self._next_offset[partition] = offset + 1
        try:
            record = parse_stage_record(value)
        except (ValueError, KeyError, TypeError) as exc:
            # Only stage 1 writes this topic: a bad record is a bug or a foreign writer.
            self.bad_records += 1
            log.error("ignoring a record of the partials topic that is not ours: %s", exc)
            return
        merger = self._merger(partition)
        if isinstance(record, PartitionProgress):
            merger.add_progress(record)
        else:
            merger.add_partial(record, self._clock(), offset)

    async def tick(self) -> dict[int, tuple[int, int | None]]:
        """Write final windows; return, per partition, the safe offset and finalized-until."""
        now = self._clock()
        finals: list[FinalRollup] = []
        mergers = list(self.mergers.items())
        for _, merger in mergers:
            finals.extend(merger.ready(now))
        if finals:
            await self._write(finals)
        safe: dict[int, tuple[int, int | None]] = {}
        for partition, merger in mergers:
            next_offset = self._next_offset.get(partition)
            if next_offset is None or self.mergers.get(partition) is not merger:
                continue
            pending = merger.min_pending_offset()
            offset = next_offset if pending is None else min(pending, next_offset)
            safe[partition] = (offset, merger.finalized_until_ms)
        return safe

    async def _write(self, finals: list[FinalRollup]) -> None:
        # Never drop a window: while MLflow is down, wait and try again (the partials topic
        # backs up meanwhile, which is the backpressure we want).
        attempt = 0
        while True:
            try:
                await asyncio.to_thread(self._writer.write, finals)
            except RetryableExportError as exc:
                attempt += 1
                self.write_retries += 1
                delay = min(self._retry_max_s, self._retry_base_s * 2 ** min(attempt, 6))
                log.warning("MLflow write failed (%s); retrying in %.0fs", exc, delay)
                await asyncio.sleep(delay)
            else:
                now = self._clock()
                self.windows_written += len(finals)
                for final in finals:
                    metrics = final.metrics()
                    self.freshness_ms_sum += now - final.window_end_ms
                    self.recent_windows.append(
                        WrittenWindow(
                            final.series.agent,
                            final.window_start_ms,
                            final.window_end_ms,
                            now,
                            int(metrics["spans"]),
                            int(metrics["errors"]),
                        )
                    )
                    log.info(
                        "wrote window %d of %s: %s",
                        final.window_start_ms,
                        final.series.agent,
                        {k: metrics[k] for k in ("spans", "errors", "tokens_total")},
                        extra={
                            "agent": final.series.agent,
                            "window_start_ms": final.window_start_ms,
                        },
                    )
                return
