"""Hours and days: each series' final windows folded into its UTC hour and day so far.

A window belongs to the hour and the day of its start, as it belongs to the run of that day.
Finalize folds every window it writes into its series' day and hour (``Calendar.add``), once
per window: a replayed window (its step already folded) changes nothing. What comes out:

- with each window, the *day so far*: the day's totals after that window, written at the
  window's step; a window folded after a later one of its day (only windows finalised
  incomplete come out of order) gets no day point of its own, its spans join the day's from
  the next point on, so the last point of a day is always its total;
- once an hour is over, its totals (``Calendar.close_hours``): when every source partition
  has closed the hour's last window (``finalized_until_ms``), or when a later window of the
  series was written (windows finalised after the maximum wait move a series on without
  that). A window that comes after its hour was written joins the day, not the hour.

Folds are merges of the windows' aggregates, so percentiles come from the merged sketches and
sums stay exact integers. The state (``SeriesDay``) serialises to JSON, so finalize keeps it
in a compacted topic and takes it up again after a restart or a rebalance.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from processor.core.aggregate import WindowAggregate
from processor.core.rollup import FinalRollup, SeriesKey

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
DAY_PREFIX = "day/"
HOUR_PREFIX = "hour/"
SUMMARY_KIND = "day"
SUMMARY_VERSION = 1

# (agent, dimensions, day start ms, window size ms): one run of MLflow
DayKey = tuple[str, tuple[str, ...], int, int]


def hour_start(timestamp_ms: int) -> int:
    return timestamp_ms // HOUR_MS * HOUR_MS


def day_start(timestamp_ms: int) -> int:
    return timestamp_ms // DAY_MS * DAY_MS


def last_window_end(period_start_ms: int, period_ms: int, window_size_ms: int) -> int:
    """End of the last window that starts within the period (it may reach past the period's
    end when the window size does not divide it)."""
    last_start = (period_start_ms + period_ms - 1) // window_size_ms * window_size_ms
    return last_start + window_size_ms


@dataclass(slots=True)
class PeriodTotals:
    """The windows of an hour or a day folded so far."""

    aggregate: WindowAggregate = field(default_factory=WindowAggregate)
    incomplete_windows: int = 0

    def fold(self, final: FinalRollup) -> None:
        self.aggregate.merge(final.aggregate)
        if not final.complete:
            self.incomplete_windows += 1

    def metrics(self, prefix: str) -> dict[str, float]:
        values = self.aggregate.metrics()
        values["incomplete_windows"] = self.incomplete_windows
        return {prefix + name: value for name, value in values.items()}

    def to_state(self) -> dict[str, Any]:
        return {
            "aggregate": self.aggregate.to_state(),
            "incomplete_windows": self.incomplete_windows,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PeriodTotals:
        return cls(WindowAggregate.from_state(state["aggregate"]), int(state["incomplete_windows"]))


@dataclass(slots=True)
class HourRollup:
    """One series' totals over one UTC hour, for the run of the hour's day."""

    series: SeriesKey
    hour_start_ms: int
    window_size_ms: int
    metrics: dict[str, float]  # named ``hour/<metric>``

    @property
    def step(self) -> int:
        return self.hour_start_ms // HOUR_MS

    @property
    def hour_end_ms(self) -> int:
        return self.hour_start_ms + HOUR_MS


@dataclass(slots=True)
class SeriesDay:
    """One series' day (of one window size): its totals so far and its hours not yet out."""

    series: SeriesKey
    window_size_ms: int
    day_start_ms: int
    day: PeriodTotals = field(default_factory=PeriodTotals)
    windows: set[int] = field(default_factory=set)  # steps folded
    last_step: int | None = None  # the latest step that had a day point
    hours: dict[int, PeriodTotals] = field(default_factory=dict)  # hour start -> totals
    hours_written: set[int] = field(default_factory=set)

    @property
    def key(self) -> DayKey:
        return (self.series.agent, self.series.dimensions, self.day_start_ms, self.window_size_ms)

    def record_key(self) -> bytes:
        return summary_key(self.key)

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "kind": SUMMARY_KIND,
                "v": SUMMARY_VERSION,
                "agent": self.series.agent,
                "dimensions": list(self.series.dimensions),
                "window_size_ms": self.window_size_ms,
                "day_start_ms": self.day_start_ms,
                "day": self.day.to_state(),
                "windows": _ranges(self.windows),
                "last_step": self.last_step,
                "hours": {str(start): totals.to_state() for start, totals in self.hours.items()},
                "hours_written": sorted(self.hours_written),
            },
            option=orjson.OPT_SORT_KEYS,
        )

    @classmethod
    def from_bytes(cls, payload: bytes) -> SeriesDay:
        """Parse a record of the summaries topic; raises ValueError on anything else."""
        document: dict[str, Any] = orjson.loads(payload)
        if document.get("kind") != SUMMARY_KIND:
            raise ValueError(f"not a day summary: kind {document.get('kind')!r}")
        try:
            return cls(
                series=SeriesKey(str(document["agent"]), tuple(document["dimensions"])),
                window_size_ms=int(document["window_size_ms"]),
                day_start_ms=int(document["day_start_ms"]),
                day=PeriodTotals.from_state(document["day"]),
                windows={
                    step for first, last in document["windows"] for step in range(first, last + 1)
                },
                last_step=document["last_step"],
                hours={
                    int(start): PeriodTotals.from_state(state)
                    for start, state in document["hours"].items()
                },
                hours_written={int(start) for start in document["hours_written"]},
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed day summary: {exc!r}") from exc


def summary_key(key: DayKey) -> bytes:
    agent, dimensions, start, size = key
    return orjson.dumps([agent, list(dimensions), start, size])


class Calendar:
    """The hours and days of the series of one finalize partition."""

    def __init__(self) -> None:
        self._days: dict[DayKey, SeriesDay] = {}
        # (agent, dimensions, window size) -> the latest window start folded, of any day
        self._latest: dict[tuple[str, tuple[str, ...], int], int] = {}
        self._changed: set[DayKey] = set()
        self._closed: set[DayKey] = set()
        self.replayed_windows = 0

    def restore(self, days: Iterable[SeriesDay]) -> None:
        for day in days:
            self._days[day.key] = day
            if day.windows:
                self._note_latest(
                    day.series, day.window_size_ms, max(day.windows) * day.window_size_ms
                )

    def add(self, final: FinalRollup) -> dict[str, float] | None:
        """Fold a final window into its day and hour; return the day-so-far metrics to write
        at its step, or None (folded already, or out of order: see the module docstring)."""
        start = final.window_start_ms
        key = (final.series.agent, final.series.dimensions, day_start(start), final.window_size_ms)
        day = self._days.get(key)
        if day is None:
            day = self._days[key] = SeriesDay(final.series, final.window_size_ms, key[2])
        step = final.step
        if step in day.windows:
            self.replayed_windows += 1
            return None
        day.windows.add(step)
        day.day.fold(final)
        hour = hour_start(start)
        if hour not in day.hours_written:
            day.hours.setdefault(hour, PeriodTotals()).fold(final)
        self._note_latest(final.series, final.window_size_ms, start)
        self._changed.add(key)
        if day.last_step is not None and step < day.last_step:
            return None
        day.last_step = step
        return day.day.metrics(DAY_PREFIX)

    def close_hours(self, finalized_until_ms: int | None) -> list[HourRollup]:
        """Take the hours that are over (see the module docstring), oldest first."""
        out: list[HourRollup] = []
        for key, day in self._days.items():
            if not day.hours:
                continue
            size = day.window_size_ms
            latest = self._latest.get((key[0], key[1], size))
            for start in sorted(day.hours):
                final = finalized_until_ms is not None and finalized_until_ms >= last_window_end(
                    start, HOUR_MS, size
                )
                moved_on = latest is not None and latest >= start + HOUR_MS
                if not (final or moved_on):
                    continue
                totals = day.hours.pop(start)
                day.hours_written.add(start)
                out.append(HourRollup(day.series, start, size, totals.metrics(HOUR_PREFIX)))
                self._changed.add(key)
        out.sort(key=lambda hour: (hour.hour_start_ms, hour.series))
        return out

    def close_days(self, finalized_until_ms: int | None) -> None:
        """Forget the days every source partition has closed whose hours are all out: no
        window of theirs can come any more but a replay's, which finalize ignores."""
        if finalized_until_ms is None:
            return
        for key in [
            key
            for key, day in self._days.items()
            if not day.hours
            and finalized_until_ms >= last_window_end(day.day_start_ms, DAY_MS, day.window_size_ms)
        ]:
            del self._days[key]
            self._changed.discard(key)
            self._closed.add(key)

    def take_changes(self) -> tuple[list[SeriesDay], list[DayKey]]:
        """The days changed since the last call, and the days forgotten (to delete)."""
        changed = [self._days[key] for key in sorted(self._changed) if key in self._days]
        closed = sorted(self._closed)
        self._changed.clear()
        self._closed.clear()
        return changed, closed

    @property
    def open_days(self) -> int:
        return len(self._days)

    def _note_latest(self, series: SeriesKey, size: int, start: int) -> None:
        latest_key = (series.agent, series.dimensions, size)
        if start > self._latest.get(latest_key, start - 1):
            self._latest[latest_key] = start


def _ranges(steps: set[int]) -> list[list[int]]:
    """Sorted steps as [first, last] runs: a day's windows are one or a few runs."""
    runs: list[list[int]] = []
    for step in sorted(steps):
        if runs and step == runs[-1][1] + 1:
            runs[-1][1] = step
        else:
            runs.append([step, step])
    return runs
