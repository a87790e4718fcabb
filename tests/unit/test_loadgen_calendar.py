"""The truth's all-agents series, hourly totals and day-so-far totals.

Traffic from five minutes before a UTC midnight to past it, in one-minute windows, so that it
covers two hours and two days. Expected values are recomputed from a literal recount of the
published spans (``brute_force_groups``), so percentiles are checked against the union of
the spans' latencies, not against the truth's own windows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from functools import cache
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from processor.core.rollup import ALL_AGENTS
from processor.loadgen import (
    DaySoFar,
    GeneratedTrace,
    Rollup,
    Scenario,
    TraceGenerator,
    Truth,
    TruthBuilder,
    lower_quantile,
)
from processor.loadgen import truth as truth_module
from tests.unit.test_loadgen import brute_force_groups, invocation_latencies

WINDOW_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
MIDNIGHT_MS = 1_700_006_400_000  # 2023-11-15T00:00:00Z
assert MIDNIGHT_MS % DAY_MS == 0
START_MS = MIDNIGHT_MS - 5 * WINDOW_MS
AGENTS = ("orchestrator", "researcher", "coder", "critic", "planner")
COUNTED = (
    "spans",
    "errors",
    "llm_calls",
    "tokens_prompt",
    "tokens_completion",
    "tokens_total",
    "tokens_cache_read",
    "tokens_cache_write",
    "tokens_reasoning",
    "unpriced_llm_calls",
    "duplicate_spans",
)
COSTS = ("cost_usd", "cost_reported_usd", "cost_estimated_usd")

Groups = dict[tuple[int, str], list[tuple[Span, bool]]]


@cache
def traffic() -> tuple[list[GeneratedTrace], Truth, Groups]:
    """About 7 minutes of traces at 2/s, from 5 minutes before midnight, with their truth and
    their literal recount."""
    generator = TraceGenerator(
        Scenario(agents=4, trace_size=12, error_rate=0.1, seed=21), start_ms=START_MS, rate=2.0
    )
    traces = list(generator.generate(840))
    return (
        traces,
        Truth.from_traces(traces, window_size_ms=WINDOW_MS),
        dict(brute_force_groups(traces, WINDOW_MS)),
    )


def nanos(usd: float) -> int:
    return round(usd * 1_000_000_000)


def expected_totals(
    agent: str,
    start_ms: int,
    end_ms: int,
    windows: Iterable[Rollup],
    latencies: Iterable[float],
) -> dict[str, Any]:
    """What a rollup of ``agent`` over ``[start_ms, end_ms)`` holds when it sums ``windows``
    whose invocations took ``latencies``."""
    rows: list[dict[str, Any]] = [dict(window) for window in windows]
    ordered = sorted(latencies)
    counts = {metric: sum(int(row[metric]) for row in rows) for metric in COUNTED}
    costs = {metric: sum(nanos(row[metric]) for row in rows) for metric in COSTS}
    return {
        "agent": agent,
        "window_start_ms": start_ms,
        "window_end_ms": end_ms,
        **counts,
        "error_rate": counts["errors"] / counts["spans"],
        "invocations": len(ordered),
        "latency_p50_ms": lower_quantile(ordered, 50) if ordered else None,
        "latency_p95_ms": lower_quantile(ordered, 95) if ordered else None,
        "latency_p99_ms": lower_quantile(ordered, 99) if ordered else None,
        "latency_max_ms": ordered[-1] if ordered else None,
        **{metric: total / 1_000_000_000 for metric, total in costs.items()},
    }


def test_the_traffic_crosses_an_hour_and_a_day() -> None:
    _, truth, _ = traffic()
    starts = sorted({r["window_start_ms"] for r in truth.rollups})
    assert starts[0] < MIDNIGHT_MS - 3 * WINDOW_MS and starts[-1] >= MIDNIGHT_MS + WINDOW_MS
    assert {r["agent"] for r in truth.rollups} == {ALL_AGENTS, *AGENTS}
    assert {r["window_start_ms"] // HOUR_MS for r in truth.hours} == {
        MIDNIGHT_MS // HOUR_MS - 1,
        MIDNIGHT_MS // HOUR_MS,
    }
    assert {d["day_start_ms"] for d in truth.days_so_far} == {MIDNIGHT_MS - DAY_MS, MIDNIGHT_MS}


def test_every_window_has_an_all_agents_rollup_summing_its_agents() -> None:
    _, truth, groups = traffic()
    by_window: dict[int, list[Rollup]] = defaultdict(list)
    for rollup in truth.rollups:
        if rollup["agent"] != ALL_AGENTS:
            by_window[rollup["window_start_ms"]].append(rollup)
    assert sum(r["agent"] == ALL_AGENTS for r in truth.rollups) == len(by_window)
    several = 0
    for start_ms, agents in by_window.items():
        everyone = truth.rollup(ALL_AGENTS, start_ms)
        assert everyone is not None
        # Percentiles of every agent's invocations together, recounted from the spans.
        latencies = [
            latency
            for agent in AGENTS
            for latency in invocation_latencies(groups.get((start_ms, agent), []))
        ]
        expected = expected_totals(ALL_AGENTS, start_ms, start_ms + WINDOW_MS, agents, latencies)
        assert everyone == expected, start_ms
        assert everyone["invocations"] == sum(r["invocations"] for r in agents)
        several += len(agents) > 1 and len({r["latency_p95_ms"] for r in agents}) > 1
    assert several > 3  # the union is not any one agent's
    # Sorted by (window start, agent), the all-agents series among the agents.
    assert truth.rollups == sorted(truth.rollups, key=lambda r: (r["window_start_ms"], r["agent"]))


def test_each_hour_sums_the_windows_starting_in_it() -> None:
    _, truth, groups = traffic()
    windows: dict[tuple[str, int], list[Rollup]] = defaultdict(list)
    for rollup in truth.rollups:
        windows[(rollup["agent"], rollup["window_start_ms"] // HOUR_MS * HOUR_MS)].append(rollup)
    assert {(h["agent"], h["window_start_ms"]) for h in truth.hours} == set(windows)
    assert truth.hours == sorted(truth.hours, key=lambda r: (r["window_start_ms"], r["agent"]))
    for (agent, hour_ms), members in windows.items():
        hour = truth.hour(agent, hour_ms)
        assert hour is not None
        latencies = [
            latency
            for member in members
            for latency in invocation_latencies(groups[(member["window_start_ms"], agent)])
        ]
        assert hour == expected_totals(agent, hour_ms, hour_ms + HOUR_MS, members, latencies)
    # The hour before midnight and the one after it hold all the spans between them.
    everyone = [h for h in truth.hours if h["agent"] == ALL_AGENTS]
    assert len(everyone) == 2
    assert sum(h["spans"] for h in everyone) == truth.span_count
    assert truth.hour(ALL_AGENTS, MIDNIGHT_MS + HOUR_MS) is None


def test_days_so_far_run_through_each_day_and_end_on_its_total() -> None:
    _, truth, groups = traffic()
    assert [(d["agent"], d["window_start_ms"], d["window_end_ms"]) for d in truth.days_so_far] == [
        (r["agent"], r["window_start_ms"], r["window_end_ms"]) for r in truth.rollups
    ]
    days: dict[tuple[str, int], list[tuple[Rollup, DaySoFar]]] = defaultdict(list)
    for rollup, so_far in zip(truth.rollups, truth.days_so_far, strict=True):
        assert so_far["day_start_ms"] == rollup["window_start_ms"] // DAY_MS * DAY_MS
        days[(rollup["agent"], so_far["day_start_ms"])].append((rollup, so_far))
    for (agent, _), entries in days.items():
        spans = [so_far["spans"] for _, so_far in entries]
        assert spans == sorted(spans)  # never down within a day
        for count, (rollup, so_far) in enumerate(entries, start=1):
            earlier = [window for window, _ in entries[:count]]
            latencies = [
                latency
                for window in earlier
                for latency in invocation_latencies(groups[(window["window_start_ms"], agent)])
            ]
            expected = expected_totals(
                agent, rollup["window_start_ms"], rollup["window_end_ms"], earlier, latencies
            )
            assert so_far == {**expected, "day_start_ms": so_far["day_start_ms"]}
        # The first window of a day starts it afresh: its day so far is the window.
        first_window, first_so_far = entries[0]
        assert {k: v for k, v in first_so_far.items() if k != "day_start_ms"} == first_window
    # The last entry of each day is the day's total; the traffic's whole as the two days'.
    last_of_day = [entries[-1][1] for (agent, _), entries in days.items() if agent == ALL_AGENTS]
    assert len(last_of_day) == 2
    assert sum(d["spans"] for d in last_of_day) == truth.span_count


def test_days_so_far_do_not_depend_on_how_latencies_are_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The day's latencies are kept in sorted blocks; with tiny blocks, every day splits many.
    traces, truth, _ = traffic()
    monkeypatch.setattr(truth_module, "_BLOCK", 3)
    assert Truth.from_traces(traces, window_size_ms=WINDOW_MS).days_so_far == truth.days_so_far


@given(
    chunks=st.lists(
        st.lists(st.floats(min_value=0, max_value=1e6) | st.sampled_from([0.0, 1.0, 2.0])),
        max_size=12,
    ),
    block=st.integers(min_value=1, max_value=5),
)
def test_sorted_latencies_rank_like_a_sorted_list(chunks: list[list[float]], block: int) -> None:
    latencies = truth_module._SortedLatencies()
    expected: list[float] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(truth_module, "_BLOCK", block)
        for chunk in chunks:
            latencies.update(chunk)
            expected = sorted(expected + chunk)
            assert len(latencies) == len(expected)
            assert [latencies[rank] for rank in range(len(expected))] == expected
            if expected:
                assert latencies[-1] == expected[-1]
                for percent in (50, 95, 99):
                    assert lower_quantile(latencies, percent) == lower_quantile(expected, percent)
    with pytest.raises(IndexError):
        latencies[len(expected)]


def test_extra_copies_count_in_the_all_agents_series_hours_and_days() -> None:
    traces, _, _ = traffic()
    trace = traces[400]
    builder = TruthBuilder(WINDOW_MS)
    builder.add(trace)
    builder.add_copies(trace, {span_id: 2 for span_id in trace.span_ids[:3]})
    truth = builder.build()
    # Days so far are running totals: each (agent, day)'s last entry is its day.
    last_of_day = {(d["agent"], d["day_start_ms"]): d for d in truth.days_so_far}
    for series in (truth.rollups, truth.hours, list(last_of_day.values())):
        assert sum(r["duplicate_spans"] for r in series if r["agent"] != ALL_AGENTS) == 6
        assert sum(r["duplicate_spans"] for r in series if r["agent"] == ALL_AGENTS) == 6


def test_hours_and_days_so_far_survive_the_truth_file() -> None:
    _, truth, _ = traffic()
    again = Truth.from_json(truth.to_json())
    assert again == truth
    assert again.hours == truth.hours and again.hours
    assert again.days_so_far == truth.days_so_far and again.days_so_far
    # A truth file written before hours and days existed still loads.
    document = orjson.loads(truth.to_json())
    del document["hours"], document["days_so_far"]
    old = Truth.from_json(orjson.dumps(document))
    assert (old.hours, old.days_so_far) == ([], [])
    assert old.rollups == truth.rollups
