"""Helpers for integration tests: a worker as a real process, polling, reading the sinks back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from mlflow.tracking import MlflowClient

from processor.stack import StackEndpoints

T = TypeVar("T")

ROLLUP_METRICS = (
    "spans",
    "errors",
    "error_rate",
    "invocations",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "latency_max_ms",
    "llm_calls",
    "tokens_prompt",
    "tokens_completion",
    "tokens_total",
    "tokens_cache_read",
    "tokens_cache_write",
    "tokens_reasoning",
    "cost_usd",
    "cost_reported_usd",
    "cost_estimated_usd",
    "unpriced_llm_calls",
    "late_spans",
    "duplicate_spans",
)


EXACT_METRICS = (
    "spans",
    "errors",
    "invocations",
    "llm_calls",
    "tokens_prompt",
    "tokens_completion",
    "tokens_total",
    "tokens_cache_read",
    "tokens_cache_write",
    "tokens_reasoning",
    "unpriced_llm_calls",
)
# In 1e-9 USD the sums are exact integers; as dollars, equal to a nano-dollar.
COST_METRICS = ("cost_usd", "cost_reported_usd", "cost_estimated_usd")
PERCENTILE_METRICS = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms")


def assert_window_equals_truth(
    key: object, got: Mapping[str, float], want: Mapping[str, object]
) -> None:
    """One window in MLflow against loadgen's truth: counts and tokens exact, cost to 1e-9, no
    late span, copies of spans counted as copies only, percentiles within the sketch's 1% (and
    none at all without an invocation)."""
    for metric in EXACT_METRICS:
        assert got[metric] == want[metric], (key, metric, got[metric], want[metric])
    for metric in COST_METRICS:
        assert got[metric] == pytest.approx(want[metric], abs=1e-9), (key, metric)
    assert got["late_spans"] == 0, key
    assert got["duplicate_spans"] == want["duplicate_spans"], (key, "duplicate_spans")
    if want["invocations"] == 0:
        # No invocation ended in this window: no latency to report, and none invented.
        assert not set(PERCENTILE_METRICS) & set(got), (key, got)
        return
    for metric in PERCENTILE_METRICS:
        assert got[metric] == pytest.approx(want[metric], rel=0.01), (key, metric)
    assert got["latency_max_ms"] == pytest.approx(want["latency_max_ms"], abs=1e-6)


def poll_until(
    probe: Callable[[], T | None], *, timeout_s: float, interval_s: float = 1.0, what: str
) -> T:
    """Call ``probe`` until it returns something other than None; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last is not None:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@dataclass
class WorkerProcess:
    """`trace-processor worker` as ops run it: a separate process, configured by environment."""

    env: dict[str, str]
    log_path: Path
    args: Sequence[str] = ()  # after `worker` on the command line, e.g. ("--roles", "forward")
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> WorkerProcess:
        log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "processor.cli", "worker", *self.args],
            env=self.env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        log_file.close()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def environment_without_settings() -> dict[str, str]:
    """This process's environment without any of the product's settings (the developer's
    shell may hold some)."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PROCESSOR_", "KAFKA_", "MLFLOW_", "PHOENIX_"))
    }


def worker_env(
    endpoints: StackEndpoints, *, name: str, data_dir: Path, **overrides: str
) -> dict[str, str]:
    """Environment of a worker whose topics, group and experiment are this test's own."""
    env = environment_without_settings()
    env.update(
        {
            "KAFKA_BOOTSTRAP_SERVERS": endpoints.kafka_bootstrap,
            "MLFLOW_TRACKING_URI": endpoints.mlflow_url,
            "MLFLOW_EXPERIMENT_NAME": name,
            "PHOENIX_COLLECTOR_ENDPOINT": endpoints.phoenix_url,
            "PROCESSOR_APP_ID": name,
            "PROCESSOR_SPANS_TOPIC": f"{name}.spans",
            "PROCESSOR_DEAD_LETTER_TOPIC": f"{name}.dlq",
            "PROCESSOR_PARTIALS_TOPIC": f"{name}.partials",
            "PROCESSOR_SUMMARIES_TOPIC": f"{name}.summaries",
            "PROCESSOR_ALERTS_TOPIC": f"{name}.alerts",
            # Else every test's forward role reads the one default sampled topic, and sends the
            # kept spans of the others to its own Phoenix project.
            "PROCESSOR_SAMPLED_TOPIC": f"{name}.sampled",
            "PROCESSOR_PHOENIX_PROJECT": name,
            "PROCESSOR_DATA_DIR": str(data_dir),
        }
    )
    env.update(overrides)
    return env


def phoenix_span_ids(phoenix_url: str, project: str) -> list[str]:
    """Every span id Phoenix holds for ``project``, read through its REST API."""
    ids: list[str] = []
    cursor: str | None = None
    with httpx.Client(base_url=phoenix_url, timeout=30) as client:
        while True:
            params: dict[str, str | int] = {"limit": 1000}
            if cursor:
                params["cursor"] = cursor
            response = client.get(f"/v1/projects/{project}/spans", params=params)
            if response.status_code == 404:
                return []  # the project does not exist until its first span arrives
            response.raise_for_status()
            body = response.json()
            ids.extend(span["context"]["span_id"] for span in body["data"])
            cursor = body.get("next_cursor")
            if not cursor:
                return ids


def mlflow_rollups(
    mlflow_url: str, experiment_name: str, metrics: Sequence[str] = ROLLUP_METRICS
) -> dict[tuple[str, int], dict[str, float]]:
    """{(agent, window step): {metric: value}} for every run of the experiment.

    A metric written more than once at a step (a replay with other values) shows up as a
    list length > 1 in ``mlflow_metric_rows``; here the latest value wins.
    """
    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return {}
    found: dict[tuple[str, int], dict[str, float]] = {}
    for run in _all_runs(client, experiment.experiment_id):
        agent = run.data.tags["agent"]
        for metric in metrics:
            for point in client.get_metric_history(run.info.run_id, metric):
                found.setdefault((agent, point.step), {})[metric] = point.value
    return found


def mlflow_metric_rows(mlflow_url: str, experiment_name: str) -> dict[tuple[str, str, int], int]:
    """How many rows MLflow stores per (agent, metric, step): 1 when writes are idempotent."""
    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name(experiment_name)
    rows: dict[tuple[str, str, int], int] = {}
    if experiment is None:
        return rows
    for run in _all_runs(client, experiment.experiment_id):
        agent = run.data.tags["agent"]
        for metric in ROLLUP_METRICS:
            for point in client.get_metric_history(run.info.run_id, metric):
                key = (agent, metric, point.step)
                rows[key] = rows.get(key, 0) + 1
    return rows


def _all_runs(client: MlflowClient, experiment_id: str) -> Iterator[object]:
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=500, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def expected_by_step(truth_rollups: list[Mapping[str, object]], window_size_ms: int) -> dict:
    return {
        (str(r["agent"]), int(r["window_start_ms"]) // window_size_ms): r  # type: ignore[call-overload]
        for r in truth_rollups
    }


def mlflow_metric_values(
    mlflow_url: str, experiment_name: str
) -> dict[tuple[str, str, int], set[float]]:
    """The distinct values MLflow holds per (agent, metric, step)."""
    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name(experiment_name)
    values: dict[tuple[str, str, int], set[float]] = {}
    if experiment is None:
        return values
    for run in _all_runs(client, experiment.experiment_id):
        agent = run.data.tags["agent"]
        for metric in ROLLUP_METRICS:
            for point in client.get_metric_history(run.info.run_id, metric):
                values.setdefault((agent, metric, point.step), set()).add(point.value)
    return values


MLFLOW_CLIENT_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)


@contextmanager
def mlflow_client_environment() -> Iterator[None]:
    """MLflow's client takes its server and credentials from these variables, set as a user
    sets them: a test may set them, and the process gets its own values back afterwards."""
    saved = {name: os.environ.get(name) for name in MLFLOW_CLIENT_VARIABLES}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
