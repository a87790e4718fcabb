"""Alert rules on final windows: fire once after `for` windows, resolve once, silent agents,
and the same events after a restart from the saved states."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from processor.alert_rules import AlertRule
from processor.core.aggregate import WindowAggregate
from processor.core.alerts import FIRING, RESOLVED, AlertEvaluator, AlertEvent, SeriesAlerts
from processor.core.calendar import Calendar
from processor.core.rollup import ALL_AGENTS, FinalRollup, SeriesKey
from processor.worker.summaries import parse_summary

SIZE = 60_000
T0 = 1_700_000_040_000 // SIZE * SIZE
ERRORS = AlertRule(
    name="errors", kind="threshold", metric="error_rate", op=">", threshold=0.05,
    for_windows=2, min_spans=10,
)  # fmt: skip
SILENT = AlertRule(name="silent", kind="silent", agent="coder", silent_windows=3)
DAY_COST = AlertRule(
    name="day-cost", kind="threshold", metric="day/cost_usd", op=">=", threshold=3e-9
)


def window(agent: str, index: int, *, spans: int = 20, errors: int = 0) -> FinalRollup:
    aggregate = WindowAggregate()
    for n in range(spans):
        aggregate.add(
            trace_id=bytes([index % 256, n % 256]) * 8,
            duration_ns=1_000_000,
            is_error=n < errors,
            is_invocation=n == 0,
            is_llm=True,
            tokens_prompt=1,
            tokens_completion=1,
            tokens_total=2,
            cost_nanos=1,
        )
        aggregate.note_exemplar(
            trace_id=bytes([index % 256, n % 256]) * 8,
            duration_ns=1_000_000,
            is_error=n < errors,
            is_invocation=n == 0,
        )
    return FinalRollup(SeriesKey(agent), T0 + index * SIZE, SIZE, aggregate, (0,), True)


def states(events: list[AlertEvent]) -> list[tuple[str, str, str, int]]:
    return [(e.rule, e.series.agent, e.state, (e.window_start_ms - T0) // SIZE) for e in events]


def test_an_error_rate_over_the_threshold_fires_after_two_windows_and_resolves_once() -> None:
    evaluator = AlertEvaluator([ERRORS])
    # errors per 20 spans: 0, 2, 3, 1(5%: not over), 0
    events = [
        evaluator.observe(window("coder", i, errors=e)) for i, e in enumerate([0, 2, 3, 1, 0])
    ]
    assert [states(e) for e in events] == [
        [],
        [],
        [("errors", "coder", FIRING, 2)],
        [("errors", "coder", RESOLVED, 3)],
        [],
    ]
    fired = events[2][0]
    assert fired.value == 0.15 and fired.threshold == 0.05 and fired.op == ">"
    assert fired.metric == "error_rate" and fired.window_end_ms == fired.window_start_ms + SIZE
    assert len(fired.trace_ids) == 3 + 0  # the failed traces (the exemplars)


def test_windows_with_too_little_traffic_neither_hold_nor_break_the_streak() -> None:
    evaluator = AlertEvaluator([ERRORS])
    evaluator.observe(window("coder", 0, errors=5))
    assert evaluator.observe(window("coder", 1, spans=5, errors=5)) == []  # under min_spans
    assert states(evaluator.observe(window("coder", 2, errors=5))) == [
        ("errors", "coder", FIRING, 2)
    ]


def test_a_replayed_window_gives_no_second_event() -> None:
    evaluator = AlertEvaluator([ERRORS])
    evaluator.observe(window("coder", 0, errors=5))
    assert evaluator.observe(window("coder", 1, errors=5))
    assert evaluator.observe(window("coder", 1, errors=5)) == []
    assert evaluator.observe(window("coder", 0, errors=0)) == []


def test_the_all_agents_series_is_watched_only_when_named() -> None:
    evaluator = AlertEvaluator([ERRORS])
    for i in range(3):
        assert evaluator.observe(window(ALL_AGENTS, i, errors=10)) == []
    named = AlertEvaluator([AlertRule(**{**_fields(ERRORS), "agent": ALL_AGENTS})])
    events = [e for i in range(3) for e in named.observe(window(ALL_AGENTS, i, errors=10))]
    assert states(events) == [("errors", ALL_AGENTS, FIRING, 1)]


def _fields(rule: AlertRule) -> dict:
    return {name: getattr(rule, name) for name in rule.__dataclass_fields__}


def test_a_silent_agent_fires_once_its_window_is_closed_and_resolves_when_it_is_back() -> None:
    evaluator = AlertEvaluator([SILENT])
    for i in range(3):
        assert evaluator.observe(window("coder", i)) == []
    assert evaluator.close(T0 + 3 * SIZE) == []  # window 3 not closed everywhere yet
    assert states(evaluator.close(T0 + 4 * SIZE)) == [("silent", "coder", FIRING, 3)]
    assert evaluator.close(T0 + 9 * SIZE) == []  # fires once
    assert [(r, s.agent) for r, _, s, _ in evaluator.firing()] == [("silent", "coder")]
    assert states(evaluator.observe(window("coder", 7))) == [("silent", "coder", RESOLVED, 7)]
    assert evaluator.firing() == []


def test_a_silence_found_only_when_the_agent_is_back_gives_the_same_two_events() -> None:
    evaluator = AlertEvaluator([SILENT])
    for i in range(3):
        evaluator.observe(window("coder", i))
    # No tick saw the gap: the next window with spans says when the silence began.
    assert states(evaluator.observe(window("coder", 5))) == [
        ("silent", "coder", FIRING, 3),
        ("silent", "coder", RESOLVED, 5),
    ]


def test_an_agent_that_was_not_busy_long_enough_is_not_silent() -> None:
    evaluator = AlertEvaluator([SILENT])
    evaluator.observe(window("coder", 0))
    evaluator.observe(window("coder", 1))
    assert evaluator.close(T0 + 10 * SIZE) == []
    other = AlertEvaluator([SILENT])
    for i in range(3):
        other.observe(window("writer", i))  # the rule watches coder only
    assert other.close(T0 + 10 * SIZE) == []


def test_day_rules_read_the_day_so_far() -> None:
    evaluator, calendar = AlertEvaluator([DAY_COST]), Calendar()
    events = []
    for i in range(3):
        final = window("coder", i, spans=1)
        final.day_metrics = calendar.add(final)
        events += evaluator.observe(final)
    assert states(events) == [("day-cost", "coder", FIRING, 2)]  # the day reached 3 nUSD


Step = tuple[str, int, int]  # agent, window index, errors (of 20 spans)


@settings(max_examples=200, deadline=None)
@given(
    windows=st.lists(
        st.tuples(st.sampled_from(["coder", "writer"]), st.integers(0, 11), st.integers(0, 4)),
        max_size=40,
        unique_by=lambda w: (w[0], w[1]),
    ),
    save_at=st.integers(0, 40),
    crash_at=st.integers(0, 40),
)
def test_a_restart_from_the_saved_states_sends_the_events_an_uninterrupted_run_sends(
    windows: list[Step], save_at: int, crash_at: int
) -> None:
    """Finalize saves the states with a commit; after a crash the windows after that commit
    come again. Each event key comes out with the same event, and every event of the clean
    run comes out."""
    ordered = sorted(windows, key=lambda w: (w[1], w[0]))
    rules = [ERRORS, AlertRule(name="silent", kind="silent", silent_windows=2)]

    def run(evaluator: AlertEvaluator, todo: list[Step]) -> list[AlertEvent]:
        events: list[AlertEvent] = []
        for agent, index, errors in todo:
            events += evaluator.observe(window(agent, index, errors=errors))
            events += evaluator.close(T0 + index * SIZE)  # closed up to this window's start
        return events

    clean = run(AlertEvaluator(rules), ordered)
    save_at = min(save_at, len(ordered))
    crash_at = max(save_at, min(crash_at, len(ordered)))
    first = AlertEvaluator(rules)
    sent = run(first, ordered[:save_at])
    saved = [parse_summary(states.to_bytes()) for states in first.take_changes()]
    sent += run(first, ordered[save_at:crash_at])
    restarted = AlertEvaluator(rules)
    restarted.restore(s for s in saved if isinstance(s, SeriesAlerts))
    sent += run(restarted, ordered[save_at:])
    by_key: dict[bytes, AlertEvent] = {}
    for event in sent:
        assert by_key.setdefault(event.key(), event) == event, "one key, two events"
    assert sorted(by_key) == sorted(event.key() for event in clean)
    assert set(by_key.values()) == set(clean)
