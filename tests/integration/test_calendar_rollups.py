"""Hours, days and all agents on the real stack: traffic across a UTC hour boundary, the
worker killed with SIGKILL in the middle of the first hour and restarted; every ``day/*`` and
``hour/*`` point and the all-agents series equal the truth, and no step holds two values."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from processor.core.calendar import HOUR_MS
from processor.core.rollup import ALL_AGENTS, SeriesKey
from processor.loadgen import GeneratedTrace, Scenario, TraceGenerator, publish_traces
from processor.loadgen.truth import TruthBuilder
from processor.sinks.mlflow_writer import run_name, utc_day
from processor.stack import StackEndpoints
from tests.integration.support import (
    COST_METRICS,
    EXACT_METRICS,
    PERCENTILE_METRICS,
    WorkerProcess,
    assert_window_equals_truth,
    mlflow_rollups,
    poll_until,
    worker_env,
)

pytestmark = pytest.mark.integration

WINDOW_MS = 60_000
# (agent, metric, step) -> [(value, timestamp)] of every point MLflow holds
Points = dict[tuple[str, str, int], list[tuple[float, int]]]


def _points(mlflow_url: str, experiment_name: str) -> Points:
    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None
    points: Points = {}
    for run in client.search_runs([experiment.experiment_id], max_results=500):
        agent = run.data.tags["agent"]
        for metric in run.data.metrics:
            for point in client.get_metric_history(run.info.run_id, metric):
                points.setdefault((agent, metric, point.step), []).append(
                    (point.value, point.timestamp)
                )
    return points


def _assert_equals_truth(what: str, points: Points, agent: str, step: int, want: dict) -> None:
    def value(metric: str) -> float:
        [(got, _)] = points[(agent, f"{what}/{metric}", step)]
        return got

    key = (what, agent, step)
    for metric in EXACT_METRICS:
        assert value(metric) == want[metric], (key, metric, value(metric), want[metric])
    for metric in COST_METRICS:
        assert value(metric) == pytest.approx(want[metric], abs=1e-9), (key, metric)
    assert value("late_spans") == 0 and value("incomplete_windows") == 0, key
    if want["invocations"] == 0:
        # None of the agent's invocations ended in the period yet: no latency, none invented.
        assert not [m for m in PERCENTILE_METRICS if (agent, f"{what}/{m}", step) in points]
        return
    for metric in PERCENTILE_METRICS:
        assert value(metric) == pytest.approx(want[metric], rel=0.01), (key, metric)
    assert value("latency_max_ms") == pytest.approx(want["latency_max_ms"], abs=1e-6), key


def test_hours_days_and_all_agents_equal_the_truth_through_a_sigkill_mid_hour(
    stack: StackEndpoints, unique_name: str, work_dir: Path
) -> None:
    # Event times around an hour boundary two hours back: 4 minutes before it to 4 after.
    boundary_ms = (time.time_ns() // 1_000_000) // HOUR_MS * HOUR_MS - 2 * HOUR_MS
    # Short traces, so that the allowed lateness (the longest trace) is short: the first
    # part's windows close on its own newest spans.
    scenario = Scenario(agents=10, seed=2301, latency_scale=0.1)
    generator = TraceGenerator(scenario, start_ms=boundary_ms - 4 * 60_000, rate=1.0)
    traces: list[GeneratedTrace] = list(generator.generate(480))
    builder = TruthBuilder(WINDOW_MS)
    for trace in traces:
        builder.add(trace)
    truth = builder.build()
    hours = {rollup["window_start_ms"] for rollup in truth.hours}
    assert hours == {boundary_ms - HOUR_MS, boundary_ms}, "the traffic spans two hours"

    lateness_ms = int(truth.max_trace_duration_ms) + 1_000
    env = worker_env(
        stack,
        name=unique_name,
        data_dir=work_dir / "faust",
        PROCESSOR_WINDOW_SIZE_MS=str(WINDOW_MS),
        PROCESSOR_ALLOWED_LATENESS_MS=str(lateness_ms),
        # No idle advance in the first part: the wall clock is hours ahead of the event
        # times, so an idle partition would close the first hour before the kill.
        PROCESSOR_IDLE_TIMEOUT_MS=str(3600 * 1000),
        PROCESSOR_SAMPLING_PROBABILITY="0.0",
        PROCESSOR_SAMPLING_KEEP_ERRORS="false",
    )
    topic = env["PROCESSOR_SPANS_TOPIC"]
    # The first part ends two minutes before the boundary (roots end 1 s apart): it closes
    # the first window only.
    first_part = 120
    asyncio.run(publish_traces(traces[:first_part], bootstrap=stack.kafka_bootstrap, topic=topic))
    worker = WorkerProcess(env, work_dir / "worker.log").start()
    try:
        first_window = (boundary_ms - 4 * 60_000) // WINDOW_MS
        poll_until(
            lambda: (
                (ALL_AGENTS, first_window)
                in mlflow_rollups(stack.mlflow_url, unique_name, ("spans",))
                or None
            ),
            timeout_s=180,
            what="the first windows in MLflow",
        )
        time.sleep(3)  # a commit or two: the restart then resumes from the saved days
        worker.kill()
        before_kill = _points(stack.mlflow_url, unique_name)
        assert not [key for key in before_kill if key[1].startswith("hour/")], (
            "an hour was written before the kill: the test would not cross one"
        )
        assert [key for key in before_kill if key[1] == "day/spans"], "no day point yet"

        asyncio.run(
            publish_traces(traces[first_part:], bootstrap=stack.kafka_bootstrap, topic=topic)
        )
        # Now every window and hour may close as soon as the worker is idle.
        worker = WorkerProcess(
            {**env, "PROCESSOR_IDLE_TIMEOUT_MS": "2000"}, work_dir / "worker.log"
        ).start()
        last_hour = [
            (rollup["agent"], rollup["window_start_ms"] // HOUR_MS)
            for rollup in truth.hours
            if rollup["window_start_ms"] == boundary_ms
        ]

        def every_hour_written() -> Points | None:
            found = _points(stack.mlflow_url, unique_name)
            done = all((agent, "hour/spans", step) in found for agent, step in last_hour)
            return found if done else None

        points = poll_until(every_hour_written, timeout_s=300, interval_s=3, what="every hour")
    finally:
        worker.stop()
    assert "Traceback" not in worker.log(), worker.log()[-3000:]

    # One value per metric and step, in every series, windows, days and hours alike.
    twice = {key: values for key, values in points.items() if len(values) > 1}
    assert not twice, list(twice.items())[:5]

    # Windows, the all-agents series among them.
    windows: dict[tuple[str, int], dict[str, float]] = {}
    for (agent, metric, step), values in points.items():
        if "/" not in metric:
            windows.setdefault((agent, step), {})[metric] = values[0][0]
    expected = {(r["agent"], r["window_start_ms"] // WINDOW_MS): r for r in truth.rollups}
    assert set(windows) == set(expected)
    assert ALL_AGENTS in {agent for agent, _ in windows}
    for key, want in expected.items():
        assert_window_equals_truth(key, windows[key], want)

    # The day so far at every window's step, and the hours at theirs.
    for entry in truth.days_so_far:
        step = entry["window_start_ms"] // WINDOW_MS
        _assert_equals_truth("day", points, entry["agent"], step, dict(entry))
        [(_, timestamp)] = points[(entry["agent"], "day/spans", step)]
        assert timestamp == entry["window_end_ms"]
    for hour in truth.hours:
        step = hour["window_start_ms"] // HOUR_MS
        _assert_equals_truth("hour", points, hour["agent"], step, dict(hour))
        [(_, timestamp)] = points[(hour["agent"], "hour/spans", step)]
        assert timestamp == hour["window_start_ms"] + HOUR_MS
    hour_points = {(agent, step) for agent, metric, step in points if metric == "hour/spans"}
    assert hour_points == {(h["agent"], h["window_start_ms"] // HOUR_MS) for h in truth.hours}

    # The all-agents series has runs named like the others, one per day.
    client = MlflowClient(tracking_uri=stack.mlflow_url)
    experiment = client.get_experiment_by_name(unique_name)
    assert experiment is not None
    names = {
        run.info.run_name
        for run in client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.agent = '{ALL_AGENTS}'"
        )
    }
    days = {utc_day(r["window_start_ms"]) for r in truth.rollups}
    assert names == {run_name(SeriesKey(ALL_AGENTS), day) for day in days}
    assert all(name.startswith("all agents ") for name in names)
