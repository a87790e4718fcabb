"""Read the processor's per-agent window rollups from MLflow into a pandas DataFrame.

    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python examples/read_rollups.py \
        --experiment agent-rollups [--agent coder] [--day 2024-05-01]

Prints a summary per agent and the windows with the slowest p95 latency, each with a link to
its slowest trace in Phoenix. Only MLflow's public Python API is used (``mlflow.search_runs``,
``MlflowClient.get_metric_history``, ``mlflow.artifacts.load_dict``); with MLflow's basic auth,
set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient


def read_rollups(
    experiment_name: str, *, agent: str | None = None, day: str | None = None
) -> pd.DataFrame:
    """One row per (run, window): agent, dimensions, window times, step and every metric."""
    filters = []
    if agent is not None:
        filters.append(f"tags.agent = '{agent}'")
    if day is not None:
        filters.append(f"tags.day = '{day}'")
    runs = mlflow.search_runs(
        experiment_names=[experiment_name], filter_string=" and ".join(filters)
    )
    client = MlflowClient()
    metric_names = [
        column.removeprefix("metrics.") for column in runs if column.startswith("metrics.")
    ]
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for run in runs.to_dict("records"):
        run_id = run["run_id"]
        for name in metric_names:
            # A run's latest-value column is NaN for metrics it never had (e.g. no latency).
            if pd.isna(run.get(f"metrics.{name}")):
                continue
            for point in client.get_metric_history(run_id, name):
                row = rows.setdefault(
                    (run_id, point.step),
                    {
                        "agent": run["tags.agent"],
                        "run_id": run_id,
                        "run_name": run["tags.mlflow.runName"],
                        "step": point.step,
                        "window_end": pd.Timestamp(point.timestamp, unit="ms", tz="UTC"),
                    },
                )
                row[name] = point.value
    frame = pd.DataFrame(list(rows.values()))
    if frame.empty:
        return frame
    return frame.sort_values(["window_end", "agent"]).reset_index(drop=True)


def window_record(run_id: str, step: int) -> dict[str, Any]:
    """The window's record (schemas/rollup.schema.json): exemplar traces and Phoenix links."""
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/windows/{step}.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="agent-rollups")
    parser.add_argument("--agent")
    parser.add_argument("--day", help="UTC day, YYYY-MM-DD")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    frame = read_rollups(args.experiment, agent=args.agent, day=args.day)
    if frame.empty:
        print(f"no rollups in experiment {args.experiment!r}")
        return
    pd.set_option("display.width", 160)
    summary = frame.groupby("agent").agg(
        windows=("step", "count"),
        spans=("spans", "sum"),
        errors=("errors", "sum"),
        p95_ms_median=("latency_p95_ms", "median"),
        tokens=("tokens_total", "sum"),
        cost_usd=("cost_usd", "sum"),
    )
    print(summary.to_string())
    if "latency_p95_ms" not in frame:
        return
    print("\nslowest windows (p95) and their slowest trace:")
    for row in frame.nlargest(3, "latency_p95_ms").itertuples(index=False):
        slowest = window_record(row.run_id, row.step)["exemplars"]["slowest"]
        link = slowest[0]["phoenix_url"] if slowest else "-"
        print(
            f"  {row.window_end:%Y-%m-%d %H:%M} {row.agent}: p95 {row.latency_p95_ms:.0f} ms {link}"
        )


if __name__ == "__main__":
    main()
