"""Read the processor's rollups from MLflow into pandas DataFrames: windows, hours and days.

    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python examples/read_rollups.py \
        --experiment agent-rollups [--agent coder] [--day 2024-05-01]

Prints each agent's day (the all-agents series first), its hours, and the windows with the
slowest p95 latency, each with a link to its slowest trace in Phoenix. Only MLflow's public
Python API is used (``mlflow.search_runs``, ``MlflowClient.get_metric_history``,
``mlflow.artifacts.load_dict``); with MLflow's basic auth, set MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

ALL_AGENTS = "__all__"  # the agent tag of the series of every agent
HOUR = "hour/"
DAY = "day/"


def _runs(experiment_name: str, agent: str | None, day: str | None) -> pd.DataFrame:
    filters = []
    if agent is not None:
        filters.append(f"tags.agent = '{agent}'")
    if day is not None:
        filters.append(f"tags.day = '{day}'")
    return mlflow.search_runs(
        experiment_names=[experiment_name], filter_string=" and ".join(filters)
    )


def _histories(runs: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """One row per (run, step) of the metrics named ``prefix<metric>`` (prefix "" for the
    windows' own), the prefix dropped from the column names."""
    client = MlflowClient()
    names = [
        column.removeprefix("metrics.")
        for column in runs
        if column.startswith("metrics.")
        and (
            "/" not in column.removeprefix("metrics.")
            if not prefix
            else column.startswith(f"metrics.{prefix}")
        )
    ]
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for run in runs.to_dict("records"):
        run_id = run["run_id"]
        for name in names:
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
                        "end": pd.Timestamp(point.timestamp, unit="ms", tz="UTC"),
                    },
                )
                row[name.removeprefix(prefix)] = point.value
    frame = pd.DataFrame(list(rows.values()))
    if frame.empty:
        return frame
    return frame.sort_values(["end", "agent"]).reset_index(drop=True)


def read_rollups(
    experiment_name: str, *, agent: str | None = None, day: str | None = None
) -> pd.DataFrame:
    """One row per (run, window): agent, run, step, window end (``window_end``) and every
    window metric. The all-agents series is agent ``__all__``."""
    frame = _histories(_runs(experiment_name, agent, day), "")
    return frame.rename(columns={"end": "window_end"})


def read_hours(
    experiment_name: str, *, agent: str | None = None, day: str | None = None
) -> pd.DataFrame:
    """One row per (run, UTC hour) that is over: step = hour index since the epoch,
    ``hour_end``, and every ``hour/`` metric without its prefix."""
    frame = _histories(_runs(experiment_name, agent, day), HOUR)
    return frame.rename(columns={"end": "hour_end"})


def read_days(
    experiment_name: str, *, agent: str | None = None, day: str | None = None
) -> pd.DataFrame:
    """One row per run (agent and UTC day): the day's totals so far, as MLflow's runs table
    shows them (each ``day/`` metric's latest point), without a history call."""
    runs = _runs(experiment_name, agent, day)
    if runs.empty:
        return runs
    columns = {
        column: column.removeprefix(f"metrics.{DAY}")
        for column in runs
        if column.startswith(f"metrics.{DAY}")
    }
    frame = runs[["tags.agent", "tags.day", "tags.mlflow.runName", "run_id", *columns]]
    frame = frame.rename(
        columns={"tags.agent": "agent", "tags.day": "day", "tags.mlflow.runName": "run_name"}
        | columns
    )
    if "cost_usd" not in frame:  # runs written before the processor kept days
        return frame.sort_values("day").reset_index(drop=True)
    return frame.sort_values(["day", "cost_usd"], ascending=[True, False]).reset_index(drop=True)


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

    days = read_days(args.experiment, agent=args.agent, day=args.day)
    if days.empty:
        print(f"no rollups in experiment {args.experiment!r}")
        return
    pd.set_option("display.width", 160)
    print("days (so far), by cost:")
    shown = ["day", "run_name", "spans", "errors", "error_rate", "latency_p95_ms", "cost_usd"]
    print(days[[c for c in shown if c in days]].to_string(index=False))

    hours = read_hours(args.experiment, agent=args.agent, day=args.day)
    if not hours.empty:
        print("\nhours of all agents:")
        every = hours[hours.agent == ALL_AGENTS]
        shown = ["hour_end", "spans", "errors", "latency_p95_ms", "cost_usd"]
        print(every[[c for c in shown if c in every]].to_string(index=False))

    frame = read_rollups(args.experiment, agent=args.agent, day=args.day)
    frame = frame[frame.agent != ALL_AGENTS]
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
