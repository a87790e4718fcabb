"""Rollups in a real MLflow server, read back the way analysts read them.

Each test writes FinalRollups with the real RollupWriter into its own experiment of the
session's MLflow, then reads runs, metric histories and artifacts with MLflow's own client.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import jsonschema
import orjson
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

import processor
from processor.core.aggregate import WindowAggregate
from processor.core.calendar import HOUR_MS, Calendar, HourRollup
from processor.core.rollup import FinalRollup, SeriesKey
from processor.loadgen import Scenario, TraceGenerator
from processor.sinks.mlflow_writer import RollupWriter, utc_day
from processor.stack import StackEndpoints
from tests.integration.support import mlflow_client_environment, poll_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = orjson.loads((ROOT / "schemas" / "rollup.schema.json").read_bytes())
WINDOW_MS = 60_000
MAY_1 = 1_714_521_600_000  # 2024-05-01T00:00:00Z
PARAMS = {"window_size_ms": "60000", "allowed_lateness_ms": "5000", "sampling": "errors + 10%"}


def _aggregate(seed: int, trace_ids: list[bytes] | None = None) -> WindowAggregate:
    rng = random.Random(seed)
    aggregate = WindowAggregate()
    ids = trace_ids or [rng.randbytes(16) for _ in range(rng.randint(3, 12))]
    for i, trace_id in enumerate(ids):
        prompt, completion = rng.randint(50, 900), rng.randint(10, 300)
        aggregate.add(
            trace_id=trace_id,
            duration_ns=rng.randint(5, 9_000) * 1_000_000 + i,
            is_error=rng.random() < 0.3,
            is_invocation=True,
            is_llm=rng.random() < 0.7,
            tokens_prompt=prompt,
            tokens_completion=completion,
            tokens_total=prompt + completion,
            cost_nanos=rng.randint(0, 3_000_000),
        )
    aggregate.late_spans = rng.randint(0, 2)
    aggregate.sampled_spans = rng.randint(0, len(ids))
    return aggregate


def _rollups(agents: tuple[str, ...], starts: list[int], dims: tuple[str, ...] = ()) -> list:
    return [
        FinalRollup(
            SeriesKey(agent, dims),
            start,
            WINDOW_MS,
            _aggregate(zlib.crc32(f"{agent}@{start}".encode())),
            (0, 1),
            complete=True,
        )
        for start in starts
        for agent in agents
    ]


def _runs_by_name(client: MlflowClient, experiment_name: str) -> dict[str, Any]:
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, "the writer creates the experiment when it is missing"
    return {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}


def _points(client: MlflowClient, run_id: str, metric: str) -> list[tuple[int, int, float]]:
    history = client.get_metric_history(run_id, metric)
    return sorted((point.step, point.timestamp, point.value) for point in history)


def _expected_points(rollups: list[FinalRollup], metric: str) -> list[tuple[int, int, float]]:
    return sorted(
        (r.step, r.window_end_ms, float(r.metrics()[metric]))
        for r in rollups
        if metric in r.metrics()
    )


def _record(client: MlflowClient, run_id: str, step: int, tmp_path: Path) -> dict[str, Any]:
    local = client.download_artifacts(run_id, f"windows/{step}.json", str(tmp_path))
    return orjson.loads(Path(local).read_bytes())


def test_one_run_per_agent_and_utc_day_with_its_tags_params_points_and_records(
    stack: StackEndpoints, unique_name: str, tmp_path: Path
) -> None:
    # 23:58 and 23:59 on April 30, then 00:00 on May 1: the last window opens a new day's run.
    starts = [MAY_1 - 2 * WINDOW_MS, MAY_1 - WINDOW_MS, MAY_1]
    rollups = _rollups(("coder", "critic"), starts, dims=("gpt-4o",))
    writer = RollupWriter(
        tracking_uri=stack.mlflow_url,
        experiment_name=unique_name,
        params=PARAMS,
        dimension_names=["llm.model_name"],
        phoenix_url=f"{stack.phoenix_url}/v1/traces",  # the collector endpoint is accepted
    )
    writer.write(rollups)

    client = MlflowClient(stack.mlflow_url)
    runs = _runs_by_name(client, unique_name)
    assert sorted(runs) == [
        "coder gpt-4o 2024-04-30",
        "coder gpt-4o 2024-05-01",
        "critic gpt-4o 2024-04-30",
        "critic gpt-4o 2024-05-01",
    ]
    for run in runs.values():
        tags, run_id = run.data.tags, run.info.run_id
        assert tags["dimension.llm.model_name"] == "gpt-4o"
        assert tags["processor.version"] == processor.__version__
        assert tags["phoenix.url"] == stack.phoenix_url
        assert run.data.params == PARAMS
        assert run.info.run_name == f"{tags['agent']} gpt-4o {tags['day']}"
        mine = [
            r
            for r in rollups
            if r.series.agent == tags["agent"] and utc_day(r.window_start_ms) == tags["day"]
        ]
        # One point per window and metric: step = window index, timestamp = window end.
        for metric in mine[0].metrics():
            assert _points(client, run_id, metric) == _expected_points(mine, metric), metric
        for rollup in mine:
            record = _record(client, run_id, rollup.step, tmp_path / run_id)
            jsonschema.validate(record, SCHEMA)
            assert record["metrics"] == rollup.metrics()
            assert record["window_end_ms"] == rollup.window_end_ms
            assert record["dimensions"] == {"llm.model_name": "gpt-4o"}
            slowest = record["exemplars"]["slowest"]
            assert [e["trace_id"] for e in slowest] == [t for _, t in rollup.aggregate.slowest]
            assert all(
                e["phoenix_url"] == f"{stack.phoenix_url}/redirects/traces/{e['trace_id']}"
                for e in slowest + record["exemplars"]["failed"]
            )


def _rows(client: MlflowClient, experiment_name: str) -> dict[tuple[str, str, int], int]:
    rows: dict[tuple[str, str, int], int] = {}
    for name, run in _runs_by_name(client, experiment_name).items():
        for metric in run.data.metrics:
            for point in client.get_metric_history(run.info.run_id, metric):
                key = (name, metric, point.step)
                rows[key] = rows.get(key, 0) + 1
    return rows


def test_replayed_windows_leave_every_metric_history_unchanged(
    stack: StackEndpoints, unique_name: str
) -> None:
    starts = [MAY_1 + i * WINDOW_MS for i in range(4)]
    rollups = _rollups(("coder", "planner"), starts)
    client = MlflowClient(stack.mlflow_url)

    def writer() -> RollupWriter:
        return RollupWriter(
            tracking_uri=stack.mlflow_url, experiment_name=unique_name, params=PARAMS
        )

    first = writer()
    first.write(rollups[:4])  # the first two windows of both agents
    # A worker that died between two log_batch calls left part of window 3 of `coder`: some
    # metrics, not all.
    coder_run = _runs_by_name(client, unique_name)["coder 2024-05-01"].info.run_id
    torn = next(r for r in rollups if r.series.agent == "coder" and r.window_start_ms == starts[2])
    client.log_batch(
        coder_run,
        metrics=[
            Metric(name, float(value), torn.window_end_ms, torn.step)
            for name, value in sorted(torn.metrics().items())[:5]
        ],
    )

    first.write(rollups)  # the same worker, finalize replaying what it had written
    writer().write(rollups)  # a restarted worker replaying everything
    writer().write(list(reversed(rollups)))  # in another order
    # Finalize finalising a written window again with other numbers: one point per window
    # stays, with the first values (a second point at the same timestamp would be ambiguous).
    again = rollups[0]
    writer().write(
        [FinalRollup(again.series, again.window_start_ms, WINDOW_MS, _aggregate(1), (0,), True)]
    )

    rows = _rows(client, unique_name)
    metrics_per_window = {name for r in rollups for name in r.metrics()}
    assert {key[2] for key in rows} == {r.step for r in rollups}
    assert {key[1] for key in rows} == metrics_per_window
    assert set(rows.values()) == {1}, {key: n for key, n in rows.items() if n != 1}
    runs = _runs_by_name(client, unique_name)
    for agent in ("coder", "planner"):
        mine = [r for r in rollups if r.series.agent == agent]
        for metric in metrics_per_window:
            points = _points(client, runs[f"{agent} 2024-05-01"].info.run_id, metric)
            assert points == _expected_points(mine, metric), (agent, metric)


def test_days_and_hours_are_written_once_at_their_steps_whatever_is_replayed(
    stack: StackEndpoints, unique_name: str
) -> None:
    starts = [MAY_1 + HOUR_MS - 2 * WINDOW_MS + i * WINDOW_MS for i in range(3)]
    rollups = _rollups(("coder",), starts)
    calendar = Calendar()
    for rollup in rollups:
        rollup.day_metrics = calendar.add(rollup)
    hours = calendar.close_hours(finalized_until_ms=MAY_1 + 2 * HOUR_MS)
    assert [hour.step for hour in hours] == [MAY_1 // HOUR_MS, MAY_1 // HOUR_MS + 1]

    def writer() -> RollupWriter:
        return RollupWriter(tracking_uri=stack.mlflow_url, experiment_name=unique_name)

    writer().write(rollups, hours)
    # A restarted worker replaying all of it, and an hour finalised again with other values:
    # the first values stay, one point per step.
    writer().write(rollups, hours)
    changed = HourRollup(hours[0].series, hours[0].hour_start_ms, WINDOW_MS, {"hour/spans": 1.0})
    writer().write([], [changed])

    client = MlflowClient(stack.mlflow_url)
    run_id = _runs_by_name(client, unique_name)["coder 2024-05-01"].info.run_id
    spans = [r.aggregate.spans for r in rollups]
    assert _points(client, run_id, "day/spans") == [
        (r.step, r.window_end_ms, float(sum(spans[: i + 1]))) for i, r in enumerate(rollups)
    ]
    assert _points(client, run_id, "hour/spans") == [
        (MAY_1 // HOUR_MS, MAY_1 + HOUR_MS, float(sum(spans[:2]))),
        (MAY_1 // HOUR_MS + 1, MAY_1 + 2 * HOUR_MS, float(spans[2])),
    ]
    assert _points(client, run_id, "hour/latency_p95_ms")[0][2] == pytest.approx(
        hours[0].metrics["hour/latency_p95_ms"]
    )


def test_mlflow_stores_an_identical_metric_point_once(
    stack: StackEndpoints, unique_name: str
) -> None:
    """The server behaviour replays rely on (two workers racing on a window, a torn batch).

    A point equal in key, step, timestamp and value is stored once; one with another value at
    the same step is a second row, which is why the writer also skips windows it has written.
    """
    client = MlflowClient(stack.mlflow_url)
    run_id = client.create_run(client.create_experiment(unique_name)).info.run_id
    points = [
        Metric("spans", 42.0, MAY_1, 28_575_360),
        Metric("error_rate", 1 / 3, MAY_1, 28_575_360),
    ]
    client.log_batch(run_id, metrics=points)
    client.log_batch(run_id, metrics=points)
    client.log_batch(run_id, metrics=[*points, Metric("spans", 40.0, MAY_1 + 60_000, 28_575_361)])
    assert _points(client, run_id, "spans") == [
        (28_575_360, MAY_1, 42.0),
        (28_575_361, MAY_1 + 60_000, 40.0),
    ]
    assert _points(client, run_id, "error_rate") == [(28_575_360, MAY_1, 1 / 3)]
    client.log_batch(run_id, metrics=[Metric("spans", 43.0, MAY_1, 28_575_360)])
    assert len(_points(client, run_id, "spans")) == 3


def _post_trace(phoenix_url: str, project: str, payload: bytes) -> None:
    response = httpx.post(
        f"{phoenix_url}/v1/traces",
        content=payload,
        headers={"content-type": "application/x-protobuf", "x-project-name": project},
        timeout=30,
        trust_env=False,
    )
    assert response.status_code == 200, response.text


def _phoenix_trace(http: httpx.Client, trace_id: str) -> dict[str, Any] | None:
    query = "query ($id: String!) { getTraceByOtelId(traceId: $id) { project { id name } } }"
    response = http.post("/graphql", json={"query": query, "variables": {"id": trace_id}})
    response.raise_for_status()
    found: dict[str, Any] | None = response.json()["data"]["getTraceByOtelId"]
    return found


def test_exemplar_links_open_their_traces_in_phoenix(
    stack: StackEndpoints, unique_name: str, tmp_path: Path
) -> None:
    now_ms = time.time_ns() // 1_000_000
    traces = list(
        TraceGenerator(Scenario(agents=3, seed=21), start_ms=now_ms - 600_000, rate=1).generate(4)
    )
    for trace in traces:
        _post_trace(stack.phoenix_url, unique_name, trace.payload)
    window_start = now_ms - now_ms % WINDOW_MS - WINDOW_MS
    rollup = FinalRollup(
        SeriesKey("orchestrator"),
        window_start,
        WINDOW_MS,
        _aggregate(7, [trace.trace_id for trace in traces]),
        (0,),
        complete=True,
    )
    assert rollup.aggregate.failed, "the seed gives the window a failed trace"
    RollupWriter(
        tracking_uri=stack.mlflow_url, experiment_name=unique_name, phoenix_url=stack.phoenix_url
    ).write([rollup])

    client = MlflowClient(stack.mlflow_url)
    run = _runs_by_name(client, unique_name)[f"orchestrator {utc_day(window_start)}"]
    record = _record(client, run.info.run_id, rollup.step, tmp_path)
    exemplars = record["exemplars"]["slowest"] + record["exemplars"]["failed"]
    assert {e["trace_id"] for e in exemplars} <= {trace.trace_id_hex for trace in traces}
    with httpx.Client(base_url=stack.phoenix_url, timeout=30, trust_env=False) as http:
        for exemplar in exemplars:
            url = exemplar["phoenix_url"]
            assert url == f"{stack.phoenix_url}/redirects/traces/{exemplar['trace_id']}"
            assert http.get(url).status_code == 200
            # The UI answers 200 for any path; the redirect page then looks the trace up by
            # its OpenTelemetry id, exactly like this, and opens it in its project.
            found = poll_until(
                functools.partial(_phoenix_trace, http, exemplar["trace_id"]),
                timeout_s=60,
                what=f"trace {exemplar['trace_id']} in Phoenix",
            )
            assert found["project"]["name"] == unique_name
            page = http.get(f"/projects/{found['project']['id']}/traces/{exemplar['trace_id']}")
            assert page.status_code == 200
        # A trace id Phoenix never saw is not found by that lookup: the check above is real.
        assert _phoenix_trace(http, "ab" * 16) is None


def _example_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "read_rollups", ROOT / "examples" / "read_rollups.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def analyst_environment(stack: StackEndpoints) -> Iterator[None]:
    """``MLFLOW_TRACKING_URI`` set as the example's usage line sets it."""
    with mlflow_client_environment():
        os.environ["MLFLOW_TRACKING_URI"] = stack.mlflow_url
        yield


def test_the_example_reads_the_rollups_into_a_dataframe(
    stack: StackEndpoints,
    unique_name: str,
    analyst_environment: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Three windows in the last minutes of an hour and one in the next, with their days so far
    # and hours as finalize makes them.
    starts = [MAY_1 - 3 * WINDOW_MS + i * WINDOW_MS for i in range(4)]
    rollups = _rollups(("coder", "critic"), starts)
    calendar = Calendar()
    for rollup in rollups:
        rollup.day_metrics = calendar.add(rollup)
    hours = calendar.close_hours(finalized_until_ms=MAY_1 + HOUR_MS)
    RollupWriter(
        tracking_uri=stack.mlflow_url, experiment_name=unique_name, phoenix_url=stack.phoenix_url
    ).write(rollups, hours)

    frame = _example_module().read_rollups(unique_name)
    assert len(frame) == len(rollups)
    assert not [column for column in frame if "/" in column], "hours and days apart"
    # Hours: each hour's totals, at its hour index.
    got_hours = _example_module().read_hours(unique_name)
    assert sorted(zip(got_hours.agent, got_hours.step, got_hours.spans, strict=True)) == sorted(
        (hour.series.agent, hour.step, hour.metrics["hour/spans"]) for hour in hours
    )
    assert {int(s) for s in got_hours.step} == {MAY_1 // HOUR_MS - 1, MAY_1 // HOUR_MS}
    # Days: one row per run, the day's totals, costliest first.
    days = _example_module().read_days(unique_name)
    for row in days.to_dict("records"):
        windows = [
            r
            for r in rollups
            if r.series.agent == row["agent"] and utc_day(r.window_start_ms) == row["day"]
        ]
        assert row["spans"] == sum(r.aggregate.spans for r in windows)
        assert row["cost_usd"] == pytest.approx(sum(r.metrics()["cost_usd"] for r in windows))
    assert len(days) == 4  # two agents, two days (the fourth window is May 1st's)
    assert list(days.day) == sorted(days.day)
    for rollup in rollups:
        (row,) = frame[(frame.agent == rollup.series.agent) & (frame.step == rollup.step)].to_dict(
            "records"
        )
        assert row["window_end"].value // 1_000_000 == rollup.window_end_ms
        for metric, value in rollup.metrics().items():
            assert row[metric] == pytest.approx(value), metric

    only_coder = _example_module().read_rollups(unique_name, agent="coder")
    assert set(only_coder.agent) == {"coder"}

    # The script as an analyst runs it (in this process: importing pandas and MLflow again in
    # a subprocess costs more than everything else here).
    _example_module().main(["--experiment", unique_name])
    printed = capsys.readouterr().out
    assert "coder" in printed and "critic" in printed
    assert f"{stack.phoenix_url}/redirects/traces/" in printed
