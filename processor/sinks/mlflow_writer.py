"""Write final rollups to MLflow: one run per series per UTC day, one point per window.

Writes are deterministic: ``step`` is the window index, ``timestamp`` the window end in ms and
the values depend only on the spans, so a replayed window writes the same rows again, which
MLflow stores once. The MLflow client is synchronous; the worker calls ``write`` in a thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime

import orjson
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from processor import __version__
from processor.core.rollup import FinalRollup, SeriesKey
from processor.errors import RetryableExportError

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000
RUN_KEY_TAG = "trace_processor.run_key"
AGENT_TAG = "agent"


class RollupWriter:
    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment_name: str,
        params: dict[str, str] | None = None,
        dimension_names: Sequence[str] = (),
        phoenix_url: str | None = None,
    ) -> None:
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._experiment_name = experiment_name
        self._experiment_id: str | None = None
        self._params = params or {}
        self._dimension_names = tuple(dimension_names)
        self._phoenix_url = phoenix_url
        self._runs: dict[str, str] = {}  # run key -> run id

    def write(self, rollups: Sequence[FinalRollup]) -> None:
        """Write every rollup; raises RetryableExportError while MLflow is unreachable."""
        try:
            by_run: dict[str, list[FinalRollup]] = {}
            for rollup in rollups:
                by_run.setdefault(self._run_id(rollup), []).append(rollup)
            for run_id, items in by_run.items():
                metrics = [
                    Metric(name, float(value), rollup.window_end_ms, rollup.step)
                    for rollup in items
                    for name, value in sorted(rollup.metrics().items())
                ]
                tags = [self._exemplar_tag(items[-1])]
                for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                    chunk = metrics[start : start + MAX_METRICS_PER_BATCH]
                    self._client.log_batch(run_id, metrics=chunk, tags=tags if start == 0 else [])
        except MlflowException as exc:
            raise RetryableExportError(f"MLflow write failed: {exc}") from exc
        except OSError as exc:
            raise RetryableExportError(f"MLflow unreachable: {exc}") from exc

    def _exemplar_tag(self, rollup: FinalRollup) -> RunTag:
        aggregate = rollup.aggregate
        value = {
            "window_start_ms": rollup.window_start_ms,
            "slowest": [trace for _, trace in aggregate.slowest],
            "failed": aggregate.failed,
        }
        return RunTag("exemplars.latest", orjson.dumps(value).decode())

    def _experiment(self) -> str:
        if self._experiment_id is None:
            experiment = self._client.get_experiment_by_name(self._experiment_name)
            if experiment is None:
                try:
                    self._experiment_id = self._client.create_experiment(self._experiment_name)
                except MlflowException:
                    # another worker created it first
                    experiment = self._client.get_experiment_by_name(self._experiment_name)
                    if experiment is None:
                        raise
                    self._experiment_id = experiment.experiment_id
            else:
                self._experiment_id = experiment.experiment_id
        return self._experiment_id

    def _run_id(self, rollup: FinalRollup) -> str:
        day = datetime.fromtimestamp(rollup.window_start_ms / 1000, tz=UTC).strftime("%Y-%m-%d")
        key = run_key(rollup.series, day)
        run_id = self._runs.get(key)
        if run_id is not None:
            return run_id
        experiment_id = self._experiment()
        found = self._client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
        else:
            series = rollup.series
            tags = {
                RUN_KEY_TAG: key,
                AGENT_TAG: series.agent,
                "day": day,
                "processor.version": __version__,
                "mlflow.runName": run_name(series, day),
            }
            for name, value in zip(self._dimension_names, series.dimensions, strict=False):
                tags[f"dimension.{name}"] = value
            run = self._client.create_run(experiment_id, tags=tags, run_name=run_name(series, day))
            run_id = run.info.run_id
            for name, value in self._params.items():
                self._client.log_param(run_id, name, value)
            # The run stays open all day: windows keep arriving; "FINISHED" would mislead.
        self._runs[key] = run_id
        return run_id


def run_name(series: SeriesKey, day: str) -> str:
    suffix = "".join(f" {value}" for value in series.dimensions)
    return f"{series.agent}{suffix} {day}"


def run_key(series: SeriesKey, day: str) -> str:
    # Quotes are not allowed inside the MLflow filter string: keep the key to a safe alphabet.
    raw = "|".join((series.agent, *series.dimensions, day))
    return "".join(ch if ch.isalnum() or ch in "-_.|: " else "_" for ch in raw)
