"""Alert rules evaluated on final windows, in event time, so a replay or another worker
decides the same.

Per rule and series (``RuleState``): a threshold rule *fires* at the first window in which
its condition has held for ``for`` consecutive windows of the series, and *resolves* at the
first window in which it no longer holds. Consecutive means the series' own windows in step
order: a window with fewer than ``min_spans`` spans, or none at all, neither holds nor breaks
the streak. A rule on ``day/<metric>`` is evaluated on each window's day so far, one on
``hour/<metric>`` on each hour once it is over (consecutive hours).

A *silent* rule fires at the first window, closed by every source partition, in which a
series that had spans in each of the ``windows`` windows before has none; it resolves at the
series' next window with spans.

Each window of a series is evaluated once: a window at or before the last one evaluated (a
replay) is skipped, so events come once, and at most again with the same key after a crash
(the state is saved with the finalize commit, like the days).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from processor.core.calendar import DAY_PREFIX, HOUR_MS, HOUR_PREFIX, HourRollup
from processor.core.rollup import FinalRollup, SeriesKey, dimension_items

ALERTS_KIND = "alerts"
ALERTS_VERSION = 1
FIRING = "firing"
RESOLVED = "resolved"
SILENT_METRIC = "spans"  # what a silent rule's events report: no spans in the window


class Rule(Protocol):
    """What the evaluator needs of a rule (``processor.alert_rules.AlertRule``)."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def metric(self) -> str | None: ...
    @property
    def op(self) -> str | None: ...
    @property
    def threshold(self) -> float | None: ...
    @property
    def for_windows(self) -> int: ...
    @property
    def min_spans(self) -> int: ...
    @property
    def severity(self) -> str: ...
    @property
    def silent_windows(self) -> int: ...
    def matches(self, agent: str, dimensions: Mapping[str, str]) -> bool: ...
    def holds(self, value: float | None) -> bool: ...


@dataclass(frozen=True, slots=True)
class AlertEvent:
    rule: str
    severity: str
    state: str  # FIRING or RESOLVED
    series: SeriesKey
    metric: str
    op: str
    value: float | None
    threshold: float
    window_start_ms: int
    window_end_ms: int
    window_size_ms: int  # of the series' windows: which MLflow run the event belongs to
    trace_ids: tuple[str, ...] = ()  # exemplars of the window (failed first, then slowest)

    def key(self) -> bytes:
        """(rule, series, window): a consumer drops a replayed copy by it."""
        return orjson.dumps(
            [self.rule, self.series.agent, list(self.series.dimensions), self.window_start_ms]
        )


@dataclass(slots=True)
class RuleState:
    """One rule's memory of one series."""

    streak: int = 0  # consecutive windows (or hours) the condition held
    firing: bool = False
    last_step: int | None = None  # the latest window (hour) evaluated
    since_ms: int | None = None  # start of the window it fired in

    def to_state(self) -> list[Any]:
        return [self.streak, self.firing, self.last_step, self.since_ms]

    @classmethod
    def from_state(cls, state: list[Any]) -> RuleState:
        streak, firing, last_step, since_ms = state
        return cls(int(streak), bool(firing), last_step, since_ms)


# (agent, dimensions, window size ms)
SeriesRef = tuple[str, tuple[str, ...], int]


@dataclass(slots=True)
class SeriesAlerts:
    """The states of every rule for one series (of one window size)."""

    series: SeriesKey
    window_size_ms: int
    rules: dict[str, RuleState] = field(default_factory=dict)

    @property
    def ref(self) -> SeriesRef:
        return (self.series.agent, self.series.dimensions, self.window_size_ms)

    def record_key(self) -> bytes:
        return orjson.dumps(
            [ALERTS_KIND, self.series.agent, list(self.series.dimensions), self.window_size_ms]
        )

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "kind": ALERTS_KIND,
                "v": ALERTS_VERSION,
                "agent": self.series.agent,
                "dimensions": list(self.series.dimensions),
                "window_size_ms": self.window_size_ms,
                "rules": {name: state.to_state() for name, state in self.rules.items()},
            },
            option=orjson.OPT_SORT_KEYS,
        )

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> SeriesAlerts:
        try:
            return cls(
                SeriesKey(str(document["agent"]), tuple(document["dimensions"])),
                int(document["window_size_ms"]),
                {
                    str(name): RuleState.from_state(state)
                    for name, state in document["rules"].items()
                },
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed alert states: {exc!r}") from exc


class AlertEvaluator:
    """Every rule over the series of one finalize partition."""

    def __init__(self, rules: Sequence[Rule], dimension_names: Sequence[str] = ()) -> None:
        self._rules = tuple(rules)
        self._dimension_names = tuple(dimension_names)
        self._series: dict[SeriesRef, SeriesAlerts] = {}
        self._changed: set[SeriesRef] = set()
        # (agent, *dimensions) -> the rules that watch it (glob matches, once per series)
        self._matching: dict[tuple[str, ...], tuple[Rule, ...]] = {}

    def restore(self, states: Iterable[SeriesAlerts]) -> None:
        known = {rule.name for rule in self._rules}
        for alerts in states:
            # A rule removed from the file since: its state goes with it.
            alerts.rules = {n: s for n, s in alerts.rules.items() if n in known}
            self._series[alerts.ref] = alerts

    def observe(self, final: FinalRollup) -> list[AlertEvent]:
        """Evaluate the threshold and silent rules on a final window of its series."""
        rules = self._rules_for(final.series)
        if not rules:
            return []
        alerts = self._alerts(final.series, final.window_size_ms)
        step = final.step
        metrics: dict[str, float] | None = None
        events: list[AlertEvent] = []
        for rule in rules:
            state = alerts.rules.setdefault(rule.name, RuleState())
            if rule.kind == "silent":
                events.extend(self._silent_seen(rule, state, final))
                continue
            metric = rule.metric or ""
            if metric.startswith(HOUR_PREFIX):
                continue  # evaluated on hours
            if state.last_step is not None and step <= state.last_step:
                continue  # evaluated already: a replay
            state.last_step = step
            self._changed.add(alerts.ref)
            if final.aggregate.spans < rule.min_spans:
                continue
            if metric.startswith(DAY_PREFIX):
                if final.day_metrics is None:
                    continue  # out of order: no day point of its own
                value = final.day_metrics.get(metric)
            else:
                if metrics is None:
                    metrics = final.metrics()
                value = metrics.get(metric)
            events.extend(self._judge(rule, state, alerts, value, final.window_start_ms, final))
        return events

    def observe_hour(self, hour: HourRollup) -> list[AlertEvent]:
        """Evaluate the rules on ``hour/`` metrics on an hour that is over."""
        rules = [
            rule
            for rule in self._rules_for(hour.series)
            if rule.kind != "silent" and (rule.metric or "").startswith(HOUR_PREFIX)
        ]
        if not rules:
            return []
        alerts = self._alerts(hour.series, hour.window_size_ms)
        events: list[AlertEvent] = []
        for rule in rules:
            state = alerts.rules.setdefault(rule.name, RuleState())
            if state.last_step is not None and hour.step <= state.last_step:
                continue
            state.last_step = hour.step
            self._changed.add(alerts.ref)
            if hour.metrics.get(HOUR_PREFIX + "spans", 0.0) < rule.min_spans:
                continue
            value = hour.metrics.get(rule.metric or "")
            events.extend(self._judge(rule, state, alerts, value, hour.hour_start_ms, None))
        return events

    def close(self, finalized_until_ms: int | None) -> list[AlertEvent]:
        """Fire the silent rules whose series had no spans in a window every source partition
        has closed."""
        if finalized_until_ms is None:
            return []
        events: list[AlertEvent] = []
        for alerts in self._series.values():
            size = alerts.window_size_ms
            for rule in self._rules_for(alerts.series):
                if rule.kind != "silent":
                    continue
                state = alerts.rules.get(rule.name)
                if state is None or state.firing or state.last_step is None:
                    continue
                silent_start = (state.last_step + 1) * size
                if silent_start + size > finalized_until_ms:
                    continue  # that window is not closed everywhere yet
                if state.streak >= rule.silent_windows:
                    events.append(self._fire_silent(rule, state, alerts, silent_start))
        return events

    def take_changes(self) -> list[SeriesAlerts]:
        changed = [self._series[ref] for ref in sorted(self._changed)]
        self._changed.clear()
        return changed

    def firing(self) -> list[tuple[str, str, SeriesKey, int]]:
        """(rule, severity, series, since ms) of every alert firing now."""
        severity = {rule.name: rule.severity for rule in self._rules}
        return [
            (name, severity[name], alerts.series, state.since_ms or 0)
            for alerts in self._series.values()
            for name, state in sorted(alerts.rules.items())
            if state.firing and name in severity
        ]

    def _silent_seen(self, rule: Rule, state: RuleState, final: FinalRollup) -> list[AlertEvent]:
        step = final.step
        if final.aggregate.spans == 0 or (state.last_step is not None and step <= state.last_step):
            return []
        alerts = self._alerts(final.series, final.window_size_ms)
        self._changed.add(alerts.ref)
        events: list[AlertEvent] = []
        gap = state.last_step is not None and step > state.last_step + 1
        if gap and not state.firing and state.streak >= rule.silent_windows:
            # The windows in between had no spans of the series: it fell silent there, and
            # is back now (however the ticks fell, the same two events).
            assert state.last_step is not None
            start = (state.last_step + 1) * final.window_size_ms
            events.append(self._fire_silent(rule, state, alerts, start))
        if state.firing:
            state.firing = False
            state.since_ms = None
            events.append(
                self._event(
                    rule, RESOLVED, alerts, final.window_start_ms, final, final.aggregate.spans
                )
            )
        state.streak = 1 if gap or state.last_step is None else state.streak + 1
        state.last_step = step
        return events

    def _fire_silent(
        self, rule: Rule, state: RuleState, alerts: SeriesAlerts, start_ms: int
    ) -> AlertEvent:
        state.firing = True
        state.since_ms = start_ms
        state.streak = 0
        self._changed.add(alerts.ref)
        return self._event(rule, FIRING, alerts, start_ms, None, 0.0)

    def _judge(
        self,
        rule: Rule,
        state: RuleState,
        alerts: SeriesAlerts,
        value: float | None,
        start_ms: int,
        final: FinalRollup | None,
    ) -> list[AlertEvent]:
        if rule.holds(value):
            state.streak += 1
            if not state.firing and state.streak >= rule.for_windows:
                state.firing = True
                state.since_ms = start_ms
                return [self._event(rule, FIRING, alerts, start_ms, final, value)]
            return []
        state.streak = 0
        if state.firing:
            state.firing = False
            state.since_ms = None
            return [self._event(rule, RESOLVED, alerts, start_ms, final, value)]
        return []

    def _event(
        self,
        rule: Rule,
        status: str,
        alerts: SeriesAlerts,
        start_ms: int,
        final: FinalRollup | None,
        value: float | None,
    ) -> AlertEvent:
        metric = rule.metric or ""
        if rule.kind == "silent":
            size = alerts.window_size_ms
            metric, op, threshold = SILENT_METRIC, "<", 1.0
        else:
            size = HOUR_MS if metric.startswith(HOUR_PREFIX) else alerts.window_size_ms
            op, threshold = rule.op or ">", float(rule.threshold or 0.0)
        traces: tuple[str, ...] = ()
        if final is not None:
            failed = list(final.aggregate.failed)
            slowest = [trace for _, trace in final.aggregate.slowest if trace not in failed]
            traces = tuple(failed + slowest)
        return AlertEvent(
            rule=rule.name,
            severity=rule.severity,
            state=status,
            series=alerts.series,
            metric=metric,
            op=op,
            value=value,
            threshold=threshold,
            window_start_ms=start_ms,
            window_end_ms=start_ms + size,
            window_size_ms=alerts.window_size_ms,
            trace_ids=traces,
        )

    def _alerts(self, series: SeriesKey, size: int) -> SeriesAlerts:
        ref = (series.agent, series.dimensions, size)
        alerts = self._series.get(ref)
        if alerts is None:
            alerts = self._series[ref] = SeriesAlerts(series, size)
        return alerts

    def _rules_for(self, series: SeriesKey) -> tuple[Rule, ...]:
        key = (series.agent, *series.dimensions)
        rules = self._matching.get(key)
        if rules is None:
            dimensions = dict(dimension_items(self._dimension_names, series.dimensions))
            rules = self._matching[key] = tuple(
                rule for rule in self._rules if rule.matches(series.agent, dimensions)
            )
        return rules
