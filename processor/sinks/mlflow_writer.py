"""Write final rollups to MLflow, in the layout analysts read (``docs/analysts.md``).

Layout:

- the experiment ``experiment_name``, created when missing;
- one run per series (agent and dimension values) per UTC day (of the window start), named
  ``"<agent> [<dimension values>] <YYYY-MM-DD>"``, tagged ``agent``, ``dimension.<name>``,
  ``day``, ``processor.version``, with the writer's ``params`` (window size, allowed lateness,
  sampling policy) as run params; a change of window size starts a new run, because steps of
  two window sizes cannot share one chart;
- per window, one point per metric (names in ``schemas/metrics.md``), ``step`` = window
  index, ``timestamp`` = window end in ms, with the series' day so far (``day/<metric>``) at
  the same step; and the artifact ``windows/<step>.json``, the window's record
  (``schemas/rollup.schema.json``) with its exemplar traces and their Phoenix links;
- per UTC hour, once it is over, one point per ``hour/<metric>``, ``step`` = hour index
  since the epoch, ``timestamp`` = hour end, on the run of the hour's day;
- the series of every agent (agent ``__all__``) in runs named ``all agents <YYYY-MM-DD>``.

Idempotence. MLflow stores a metric point that is identical in key, step, timestamp and value
once (checked against ``mlflow server`` 3.17: the metrics table's primary key includes the
value and ``log_batch`` skips the rows that exist), so a replayed window with the same values
adds no rows. The same window with *other* values (finalize finalising it again, e.g. a window
first finalised incomplete) would add a second point at its step, at the same timestamp, which
readers cannot tell from the first (MLflow orders a history by timestamp, step, value). So the
writer keeps one point per window and metric: it remembers which windows each run holds and
skips them, the first values stay. Each window's ``spans`` point goes last and marks the window
written (its day points go before it); an hour's ``hour/spans`` marks the hour. A run's marks
are read from those two histories once, when the run is looked up.

Failures. MLflow's client retries for minutes by default (7 retries, exponential backoff,
120 s timeout). Finalize retries a failed write forever with its own backoff, so the writer
makes calls fail fast (`CLIENT_HTTP_POLICY`) and turns every failure of the environment
(connection refused, timeouts, 5xx, 401/403, a run or experiment deleted under it) into
``RetryableExportError``. A request MLflow rejects as invalid is a bug: ``PermanentExportError``.

Credentials come from MLflow's own variables (``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD``, or ``MLFLOW_TRACKING_TOKEN``), read by its client on each request.
The client is synchronous; the worker calls ``write`` in a thread, one call at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import requests
from mlflow.entities import Metric, Param, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from processor import __version__
from processor.core.alerts import AlertEvent
from processor.core.calendar import HOUR_PREFIX, HourRollup
from processor.core.rollup import ALL_AGENTS, FinalRollup, SeriesKey, dimension_items, iso_ms
from processor.core.spans import NANOS_PER_MILLI
from processor.errors import PermanentExportError, RetryableExportError
from processor.sinks.phoenix_links import trace_url, ui_base_url

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 250  # MLflow allows 8000; dimension values longer than this are noise
RECORD_VERSION = 1
WINDOWS_ARTIFACT_DIR = "windows"
# Logged last for each window: its presence at a step means the whole window is in MLflow.
WRITTEN_MARKER_METRIC = "spans"
HOUR_MARKER_METRIC = HOUR_PREFIX + "spans"
ALL_AGENTS_RUN_NAME = "all agents"

RUN_KEY_TAG = "trace_processor.run_key"
AGENT_TAG = "agent"
DAY_TAG = "day"
VERSION_TAG = "processor.version"
DIMENSION_TAG_PREFIX = "dimension."
PHOENIX_TAG = "phoenix.url"
ALERT_TAG_PREFIX = "alert."
NOTE_TAG = "mlflow.note.content"  # the run's description, rendered as Markdown by the UI

# MLflow's client reads its HTTP policy from these variables on every request. Values already
# in the environment win, so operators can still tune them. Worst case per call with these:
# 3 attempts x 20 s when the server accepts connections but never answers; about 2 s when
# nothing listens.
CLIENT_HTTP_POLICY = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    # The client's usage telemetry wraps every call (and the worker makes thousands): off
    # unless the operator turns it on (MLFLOW_DISABLE_TELEMETRY=false).
    "MLFLOW_DISABLE_TELEMETRY": "true",
}

# Before every request the MLflow client asks whether it runs on Databricks, by importing
# these. Where they are not installed each attempt searches sys.path again: a fifth of the CPU
# of writing a window (py-spy, under load). See _remember_absent.
DATABRICKS_PROBES = ("dbruntime", "pyspark", "IPython")

_RUN_CACHE_SIZE = 4096
UPLOAD_THREADS = 4
_RETRYABLE_4XX = frozenset({401, 403, 404, 408, 409, 429})


@dataclass(slots=True)
class _RunState:
    run_id: str
    written_steps: set[int] = field(default_factory=set)
    written_hours: set[int] = field(default_factory=set)  # hour steps


class RollupWriter:
    """Writes FinalRollups to one MLflow experiment; see the module docstring for the layout.

    ``params`` become the params of every run the writer creates; ``dimension_names`` name
    the series' dimension values in tags and records; ``phoenix_url`` is the Phoenix UI's base
    URL for exemplar links (a collector endpoint ending in ``/v1/traces`` is accepted), or None
    for records without links. ``windows_written`` and ``windows_skipped`` (already in MLflow)
    count windows since start.
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment_name: str,
        params: Mapping[str, str] | None = None,
        dimension_names: Sequence[str] = (),
        phoenix_url: str | None = None,
    ) -> None:
        if not experiment_name.strip():
            raise ValueError("experiment_name must not be empty; set MLFLOW_EXPERIMENT_NAME")
        if not tracking_uri.startswith(("http://", "https://")):
            raise ValueError(
                f"expected an http(s):// MLflow tracking URI, got {tracking_uri!r}; "
                "set MLFLOW_TRACKING_URI like http://127.0.0.1:5000"
            )
        for name, value in CLIENT_HTTP_POLICY.items():
            os.environ.setdefault(name, value)
        _remember_absent(DATABRICKS_PROBES)  # an http(s) tracking URI is never Databricks
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._experiment_name = experiment_name
        self._experiment_id: str | None = None
        self._params = {
            name: str(value)[:MAX_PARAM_VALUE_LENGTH] for name, value in (params or {}).items()
        }
        self._dimension_names = tuple(dimension_names)
        self._phoenix_url = ui_base_url(phoenix_url) if phoenix_url else None
        self._runs: OrderedDict[str, _RunState] = OrderedDict()  # run key -> run, LRU
        self._uploads = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="mlflow-records")
        self.windows_written = 0
        self.windows_skipped = 0
        self.hours_written = 0

    def prepare(self) -> None:
        """Look the experiment up (creating it if needed) before the first window is due:
        the client's first call also loads much of MLflow, which is better done at start-up.
        Raises like ``write``; a later ``write`` tries again."""
        with _export_errors():
            self._experiment()

    def write(
        self,
        rollups: Sequence[FinalRollup],
        hours: Sequence[HourRollup] = (),
        alerts: Sequence[AlertEvent] = (),
    ) -> list[str | None]:
        """Write every rollup and hour not yet in MLflow, and tag each alert's run of the day
        with its state (``alert.<rule>``); return the run id of each alert.

        Raises RetryableExportError while MLflow is unreachable, failing or refusing access:
        calling again with the same rollups is safe and writes each window once.
        """
        with _export_errors():
            try:
                self._write(rollups)
                self._write_hours(hours)
                return self._tag_alerts(alerts)
            except (MlflowException, requests.HTTPError) as exc:
                if _status_of(exc) not in (400, 404):
                    raise
                # The cached run or experiment may have been deleted by someone: look both up
                # afresh, once. A second rejection is not about stale ids.
                log.warning("MLflow rejected a write (%s); looking runs up again", _brief(exc))
                self._forget()
                self._write(rollups)
                self._write_hours(hours)
                return self._tag_alerts(alerts)

    def _tag_alerts(self, alerts: Sequence[AlertEvent]) -> list[str | None]:
        run_ids: list[str | None] = []
        for event in alerts:
            run = self._run(event.series, utc_day(event.window_start_ms), event.window_size_ms)
            verb = "since" if event.state == "firing" else "at"
            self._client.set_tag(
                run.run_id,
                ALERT_TAG_PREFIX + _tag_safe(event.rule),
                f"{event.state} {verb} {iso_ms(event.window_start_ms)} "
                f"(window {iso_ms(event.window_start_ms)} to {iso_ms(event.window_end_ms)})",
            )
            run_ids.append(run.run_id)
        return run_ids

    def _write_hours(self, hours: Sequence[HourRollup]) -> None:
        for hour in hours:
            run = self._run(hour.series, utc_day(hour.hour_start_ms), hour.window_size_ms)
            if hour.step in run.written_hours:
                continue  # a replay's: the first values stay, as for windows
            names = sorted(name for name in hour.metrics if name != HOUR_MARKER_METRIC)
            names.append(HOUR_MARKER_METRIC)
            self._client.log_batch(
                run.run_id,
                metrics=[
                    Metric(name, float(hour.metrics[name]), hour.hour_end_ms, hour.step)
                    for name in names
                ],
            )
            run.written_hours.add(hour.step)
            self.hours_written += 1

    def _write(self, rollups: Sequence[FinalRollup]) -> None:
        pending: dict[str, tuple[_RunState, dict[int, FinalRollup]]] = {}
        skipped = 0
        for rollup in rollups:
            run = self._run(rollup.series, utc_day(rollup.window_start_ms), rollup.window_size_ms)
            windows = pending.setdefault(run.run_id, (run, {}))[1]
            if rollup.step in run.written_steps or rollup.step in windows:
                skipped += 1
                continue
            windows[rollup.step] = rollup
        if skipped:
            # Normal after a replay. With other values (a window finalised again), the first
            # values stay: see the module docstring.
            self.windows_skipped += skipped
            log.info("skipped %d window(s) already in MLflow", skipped)
        for run, windows in pending.values():
            if not windows:
                continue
            ordered = [windows[step] for step in sorted(windows)]
            # Records go first: a window whose marker is in MLflow has its record too. One
            # upload per record, a few at once: a backlog after an outage drains faster.
            uploads = [
                self._uploads.submit(
                    self._client.log_text,
                    run.run_id,
                    orjson.dumps(
                        self.record(rollup), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2
                    ).decode(),
                    f"{WINDOWS_ARTIFACT_DIR}/{rollup.step}.json",
                )
                for rollup in ordered
            ]
            wait(uploads)
            for upload in uploads:
                upload.result()  # raises the first failure
            metrics = [metric for rollup in ordered for metric in _metrics_of(rollup)]
            for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self._client.log_batch(
                    run.run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH]
                )
            run.written_steps.update(windows)
            self.windows_written += len(windows)

    def record(self, rollup: FinalRollup) -> dict[str, Any]:
        """The window's record as analysts read it (``schemas/rollup.schema.json``)."""
        aggregate = rollup.aggregate
        return {
            "v": RECORD_VERSION,
            "agent": rollup.series.agent,
            "dimensions": dict(self._dimension_items(rollup.series)),
            "window_start_ms": rollup.window_start_ms,
            "window_end_ms": rollup.window_end_ms,
            "window_size_ms": rollup.window_size_ms,
            "window_start": iso_ms(rollup.window_start_ms),
            "window_end": iso_ms(rollup.window_end_ms),
            "step": rollup.step,
            "complete": rollup.complete,
            "metrics": rollup.metrics(),
            "exemplars": {
                "slowest": [
                    {
                        "trace_id": trace,
                        "duration_ms": duration_ns / NANOS_PER_MILLI,
                        "phoenix_url": self._link(trace),
                    }
                    for duration_ns, trace in aggregate.slowest
                ],
                "failed": [
                    {"trace_id": trace, "phoenix_url": self._link(trace)}
                    for trace in aggregate.failed
                ],
            },
        }

    def trace_link(self, trace_id_hex: str) -> str | None:
        """The Phoenix URL that opens the trace, or None without a Phoenix URL."""
        return self._link(trace_id_hex)

    def _link(self, trace_id_hex: str) -> str | None:
        return trace_url(self._phoenix_url, trace_id_hex) if self._phoenix_url else None

    def _dimension_items(self, series: SeriesKey) -> list[tuple[str, str]]:
        return dimension_items(self._dimension_names, series.dimensions)

    def _forget(self) -> None:
        self._runs.clear()
        self._experiment_id = None

    def _experiment(self) -> str:
        if self._experiment_id is not None:
            return self._experiment_id
        experiment = self._client.get_experiment_by_name(self._experiment_name)
        if experiment is None:
            try:
                self._experiment_id = self._client.create_experiment(self._experiment_name)
                return self._experiment_id
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self._client.get_experiment_by_name(self._experiment_name)
                if experiment is None:  # created and deleted in between: try again later
                    raise
        if experiment.lifecycle_stage != "active":
            raise RetryableExportError(
                f"the MLflow experiment {self._experiment_name!r} is deleted; restore it "
                "(`mlflow experiments restore`) or set MLFLOW_EXPERIMENT_NAME to another name"
            )
        self._experiment_id = experiment.experiment_id
        return self._experiment_id

    def _run(self, series: SeriesKey, day: str, window_size_ms: int) -> _RunState:
        key = run_key(series, day, window_size_ms)
        cached = self._runs.get(key)
        if cached is not None:
            self._runs.move_to_end(key)
            return cached
        experiment_id = self._experiment()
        found = self._find_runs(experiment_id, key)
        created: Run | None = None
        if not found:
            created = self._create_run(experiment_id, key, series, day, window_size_ms)
            # Two workers may create the same run at once (a rebalance); all pick the oldest.
            found = self._find_runs(experiment_id, key) or [created]
        run = min(found, key=lambda r: (r.info.start_time, r.info.run_id))
        if created is not None and created.info.run_id != run.info.run_id:
            self._client.delete_run(created.info.run_id)
        missing = [
            Param(name, value)
            for name, value in self._params.items()
            if name not in run.data.params
        ]
        if missing:
            self._client.log_batch(run.info.run_id, params=missing)
        state = _RunState(run.info.run_id)
        if created is None or created.info.run_id != run.info.run_id:
            history = self._client.get_metric_history(run.info.run_id, WRITTEN_MARKER_METRIC)
            state.written_steps = {point.step for point in history}
            hours = self._client.get_metric_history(run.info.run_id, HOUR_MARKER_METRIC)
            state.written_hours = {point.step for point in hours}
        self._runs[key] = state
        if len(self._runs) > _RUN_CACHE_SIZE:
            self._runs.popitem(last=False)
        return state

    def _find_runs(self, experiment_id: str, key: str) -> list[Run]:
        return list(
            self._client.search_runs(
                [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=10
            )
        )

    def _create_run(
        self, experiment_id: str, key: str, series: SeriesKey, day: str, window_size_ms: int
    ) -> Run:
        name = run_name(series, day)
        tags = {
            RUN_KEY_TAG: key,
            AGENT_TAG: series.agent,
            DAY_TAG: day,
            VERSION_TAG: __version__,
            NOTE_TAG: self._note(series, day, window_size_ms),
        }
        for dimension, value in self._dimension_items(series):
            tags[DIMENSION_TAG_PREFIX + _tag_safe(dimension)] = value[:MAX_TAG_VALUE_LENGTH]
        if self._phoenix_url:
            tags[PHOENIX_TAG] = self._phoenix_url
        # The run stays RUNNING: windows of its day may still arrive (late or replayed).
        run = self._client.create_run(experiment_id, tags=tags, run_name=name)
        if self._params:
            params = [Param(k, v) for k, v in self._params.items()]
            self._client.log_batch(run.info.run_id, params=params)
        log.info("created MLflow run %r (%s)", name, run.info.run_id)
        return run

    def _note(self, series: SeriesKey, day: str, window_size_ms: int) -> str:
        who = (
            "**all agents** (every span of every agent)"
            if series.agent == ALL_AGENTS
            else f"agent **{series.agent}**"
        )
        lines = [
            f"Rollups of {who} on {day} (UTC): one point per "
            f"{window_size_ms / 1000:g} s window, `step` = window index "
            f"(window start ms // {window_size_ms}), timestamp = window end.",
            "",
            "`day/<metric>`: the day so far after each window, at the window's step (the last "
            "value is the day's total); `hour/<metric>`: one point per UTC hour once it is "
            "over, `step` = hour index since the epoch, timestamp = hour end.",
            "",
            f"Each window's record, with its slowest and failed traces, is the artifact "
            f"`{WINDOWS_ARTIFACT_DIR}/<step>.json`.",
        ]
        if self._phoenix_url:
            lines.append(
                f"Open a trace in Phoenix: `{self._phoenix_url}/redirects/traces/<trace id>` "
                f"([Phoenix]({self._phoenix_url}))."
            )
        return "\n".join(lines)


def run_name(series: SeriesKey, day: str) -> str:
    """``"<agent> <YYYY-MM-DD>"``, with the dimension values between when there are any."""
    # Empty values (a span without the attribute, a non-LLM span's model) add no word; the
    # run's identity and tags still hold every value.
    agent = ALL_AGENTS_RUN_NAME if series.agent == ALL_AGENTS else series.agent
    words = (agent, *(value for value in series.dimensions if value), day)
    return " ".join(words)[:MAX_TAG_VALUE_LENGTH]


def run_key(series: SeriesKey, day: str, window_size_ms: int) -> str:
    """The run's identity, as a tag value safe inside an MLflow filter string."""
    identity = orjson.dumps([series.agent, list(series.dimensions), day, window_size_ms])
    return hashlib.sha256(identity).hexdigest()[:32]


def utc_day(timestamp_ms: int) -> str:
    return datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC).strftime("%Y-%m-%d")


def _metrics_of(rollup: FinalRollup) -> list[Metric]:
    values = rollup.metrics()
    if rollup.day_metrics is not None:
        values.update(rollup.day_metrics)
    names = sorted(name for name in values if name != WRITTEN_MARKER_METRIC)
    names.append(WRITTEN_MARKER_METRIC)
    return [Metric(name, float(values[name]), rollup.window_end_ms, rollup.step) for name in names]


def _tag_safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-/ " else "_" for ch in name)[:200]


def _remember_absent(names: Sequence[str]) -> None:
    """Make an import of each module that is not installed fail at once, without a search:
    None in ``sys.modules`` is the import system's own record of a module known absent."""
    for name in names:
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = None  # type: ignore[assignment]


def _status_of(exc: BaseException) -> int | None:
    if isinstance(exc, MlflowException):
        return int(exc.get_http_status_code())
    if isinstance(exc, requests.RequestException) and exc.response is not None:
        return int(exc.response.status_code)
    return None


def _brief(exc: BaseException) -> str:
    """One readable line: MLflow wraps connection errors in messages of several hundred
    characters whose useful part (the endpoint and the cause) comes last."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    cause = re.search(r"Caused by (\w+)\(", text)
    if cause is None:
        return text[:300]
    endpoint = re.search(r"API request to https?://[^/\s]+(/\S*)", text)
    reason = re.search(
        r"(\[Errno -?\d+\][^'\")]*|Read timed out|too many \d+ error responses)", text
    )
    where = f"{endpoint.group(1)}: " if endpoint else ""
    why = f" ({reason.group(1).strip()})" if reason else ""
    return f"{where}{cause.group(1)}{why}"


@contextlib.contextmanager
def _export_errors() -> Iterator[None]:
    """Turn what the MLflow client raises into the worker's export errors."""
    try:
        yield
    except (MlflowException, requests.RequestException) as exc:
        raise _translate(exc) from exc
    except OSError as exc:
        raise RetryableExportError(f"MLflow unreachable: {exc}") from exc


def _translate(exc: MlflowException | requests.RequestException) -> Exception:
    status = _status_of(exc)
    detail = _brief(exc)
    if status == 401:
        return RetryableExportError(
            f"MLflow refused the credentials ({detail}); set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN"
        )
    if status == 403:
        return RetryableExportError(
            f"the MLflow user may not write rollups ({detail}); give it EDIT permission on the "
            "experiment, or the right to create one"
        )
    if status is not None and 400 <= status < 500 and status not in _RETRYABLE_4XX:
        return PermanentExportError(f"MLflow rejected the write: {detail}", status=status)
    return RetryableExportError(f"MLflow write failed: {detail}")
