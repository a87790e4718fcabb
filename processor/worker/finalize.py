"""The finalize role: merge the partials of every source partition, write final windows,
their series' day so far and the hours that are over to MLflow.

Its commit rule: an offset of the partials topic is safe once every partial before it is in a
window MLflow took (or superseded by its twin) and the days and hours it changed are in the
summaries topic (handed to the producer, which faust flushes before it commits); the commit's
metadata says how far windows are final (``finalized_until_ms``), so a replay does not write
them again incomplete. Each partition's days come back from the summaries topic when the
partition is assigned: a window folded before the crash is not folded twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import orjson

from processor.clock import Clock
from processor.core.alerts import AlertEvaluator, AlertEvent, SeriesAlerts
from processor.core.calendar import Calendar, HourRollup, SeriesDay, summary_key
from processor.core.merge import RollupMerger
from processor.core.rollup import FinalRollup, PartitionProgress, parse_stage_record
from processor.errors import RetryableExportError
from processor.sinks.mlflow_writer import RollupWriter
from processor.worker.alerting import Alerting
from processor.worker.offsets import Commit, PartitionOffsets

log = logging.getLogger(__name__)

RECENT_WINDOWS = 50

# key, value (None: delete), partition of the summaries topic
SendSummary = Callable[[bytes, bytes | None, int], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class WrittenWindow:
    """A final window MLflow took: what `trace-processor status` lists."""

    agent: str
    window_start_ms: int
    window_end_ms: int
    written_at_ms: int
    spans: int
    errors: int


class FinalizeRole:
    def __init__(
        self,
        *,
        source_partitions: int,
        max_wait_ms: int,
        writer: RollupWriter,
        clock: Clock,
        send_summary: SendSummary | None = None,
        alerting: Alerting | None = None,
        retry_base_s: float = 1.0,
        retry_max_s: float = 30.0,
    ) -> None:
        self._source_partitions = source_partitions
        self._max_wait_ms = max_wait_ms
        self._writer = writer
        self._clock = clock
        # None: no summaries topic (unit tests of windows alone): days live in memory only.
        self._send_summary = send_summary
        self.alerting = alerting
        self._retry_base_s = retry_base_s
        self._retry_max_s = retry_max_s
        self.mergers: dict[int, RollupMerger] = {}
        self.calendars: dict[int, Calendar] = {}
        self.evaluators: dict[int, AlertEvaluator] = {}
        # The partials topic is compacted: its first record need not be at the commit.
        self._offsets = PartitionOffsets(log, "finalize", compacted=True)
        self.windows_written = 0
        self.write_retries = 0
        self.bad_records = 0
        # Wall clock at write time minus window end, summed over every window written.
        self.freshness_ms_sum = 0
        self.recent_windows: deque[WrittenWindow] = deque(maxlen=RECENT_WINDOWS)

    def assign(
        self,
        partition: int,
        committed: int | None,
        metadata: str = "",
        summaries: Iterable[SeriesDay | SeriesAlerts] = (),
    ) -> None:
        """Take over ``partition`` at the group's committed offset (None: no commit yet),
        with the finalised-until mark its commit carries and its days and alert states from
        the summaries topic."""
        merger = self._merger(partition)
        merger.finalized_until_ms = finalized_until(metadata)
        saved = list(summaries)
        calendar = self.calendars[partition] = Calendar()
        calendar.restore(item for item in saved if isinstance(item, SeriesDay))
        if self.alerting is not None:
            evaluator = self.evaluators[partition] = self.alerting.evaluator()
            evaluator.restore(item for item in saved if isinstance(item, SeriesAlerts))
        self._offsets.assign(partition, committed)

    def revoke_all(self) -> None:
        self.mergers.clear()
        self.calendars.clear()
        self.evaluators.clear()
        self._offsets.revoke_all()

    def _merger(self, partition: int) -> RollupMerger:
        merger = self.mergers.get(partition)
        if merger is None:
            merger = self.mergers[partition] = RollupMerger(
                source_partitions=self._source_partitions, max_wait_ms=self._max_wait_ms
            )
        return merger

    def handle(self, partition: int, offset: int, value: bytes) -> None:
        if partition not in self.mergers or not self._offsets.accept(partition, offset):
            return  # read before a rebalance took the partition away, or already seen
        try:
            record = parse_stage_record(value)
        except (ValueError, KeyError, TypeError) as exc:
            # Only aggregate writes this topic: a bad record is a bug or a foreign writer.
            self.bad_records += 1
            log.error("ignoring a record of the partials topic that is not ours: %s", exc)
            return
        merger = self._merger(partition)
        if isinstance(record, PartitionProgress):
            merger.add_progress(record)
        else:
            merger.add_partial(record, self._clock(), offset)

    async def tick(self) -> dict[int, Commit]:
        """Write final windows; return, per partition, the offset to commit and its mark."""
        now = self._clock()
        finals: list[FinalRollup] = []
        hours: list[HourRollup] = []
        events: list[AlertEvent] = []
        mergers = list(self.mergers.items())
        calendars: dict[int, Calendar] = {}
        evaluators: dict[int, AlertEvaluator | None] = {}
        for partition, merger in mergers:
            calendar = calendars[partition] = self.calendars.setdefault(partition, Calendar())
            evaluator = evaluators[partition] = self._evaluator(partition)
            ready = merger.ready(now)
            for final in ready:
                final.day_metrics = calendar.add(final)
                if evaluator is not None:
                    events.extend(evaluator.observe(final))
            finals.extend(ready)
            closed = calendar.close_hours(merger.finalized_until_ms)
            hours.extend(closed)
            if evaluator is not None:
                for hour in closed:
                    events.extend(evaluator.observe_hour(hour))
                events.extend(evaluator.close(merger.finalized_until_ms))
            calendar.close_days(merger.finalized_until_ms)
        if finals or hours or events:
            run_ids = await self._write(finals, hours, events)
            if events and self.alerting is not None:
                await self.alerting.publish(events, run_ids)
        commits: dict[int, Commit] = {}
        for partition, merger in mergers:
            if self.mergers.get(partition) is not merger:
                continue  # revoked while MLflow was written
            if not await self._save_state(partition, calendars[partition], evaluators[partition]):
                continue
            offset = self._offsets.safe(partition, merger.min_pending_offset())
            if offset is None:
                continue
            until = merger.finalized_until_ms
            metadata = "" if until is None else f'{{"finalized_until_ms":{until}}}'
            commits[partition] = Commit(offset, metadata)
        return commits

    def _evaluator(self, partition: int) -> AlertEvaluator | None:
        if self.alerting is None:
            return None
        evaluator = self.evaluators.get(partition)
        if evaluator is None:
            evaluator = self.evaluators[partition] = self.alerting.evaluator()
        return evaluator

    async def _save_state(
        self, partition: int, calendar: Calendar, evaluator: AlertEvaluator | None
    ) -> bool:
        """Hand the partition's changed days and alert states to the producer; False when it
        was revoked meanwhile (its new owner does again what this one did not save)."""
        changed, closed = calendar.take_changes()
        alerts = evaluator.take_changes() if evaluator is not None else []
        if self._send_summary is None:
            return True
        for day in changed:
            await self._send_summary(day.record_key(), day.to_bytes(), partition)
        for key in closed:
            await self._send_summary(summary_key(key), None, partition)  # compaction drops it
        for states in alerts:
            await self._send_summary(states.record_key(), states.to_bytes(), partition)
        return self.calendars.get(partition) is calendar

    def firing_alerts(self) -> list[tuple[str, str, tuple[str, ...], int]]:
        """(rule, severity, (agent, *dimensions), since ms) of every alert firing now."""
        return sorted(
            (rule, severity, (series.agent, *series.dimensions), since)
            for evaluator in self.evaluators.values()
            for rule, severity, series, since in evaluator.firing()
        )

    async def _write(
        self, finals: list[FinalRollup], hours: list[HourRollup], events: list[AlertEvent]
    ) -> list[str | None]:
        # Never drop a window: while MLflow is down, wait and try again (the partials topic
        # backs up meanwhile, which is the backpressure we want).
        attempt = 0
        while True:
            try:
                run_ids = await asyncio.to_thread(self._writer.write, finals, hours, events)
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
                return run_ids


def finalized_until(metadata: str) -> int | None:
    """The ``finalized_until_ms`` a finalize commit carries (None: none, or not ours)."""
    if not metadata:
        return None
    try:
        value = orjson.loads(metadata).get("finalized_until_ms")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
