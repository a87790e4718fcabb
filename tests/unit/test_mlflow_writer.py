"""What the MLflow writer promises without a tracking server: records, names, links, failures.

The failure tests talk to real sockets on this machine (nothing listening, a gateway that
answers 503 or 401, a server that never answers), never to a mock of MLflow's client.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import orjson
import pytest

from processor.core.aggregate import WindowAggregate
from processor.core.rollup import FinalRollup, SeriesKey
from processor.errors import RetryableExportError
from processor.sinks.mlflow_writer import (
    DATABRICKS_PROBES,
    RollupWriter,
    run_key,
    run_name,
    utc_day,
)
from processor.sinks.phoenix_links import trace_url, ui_base_url

SCHEMA = orjson.loads(
    (Path(__file__).resolve().parents[2] / "schemas" / "rollup.schema.json").read_bytes()
)
WINDOW_MS = 60_000
MAY_1 = 1_714_521_600_000  # 2024-05-01T00:00:00Z


def _aggregate(invocations: int, errors: int, extra_weight: int = 0) -> WindowAggregate:
    aggregate = WindowAggregate()
    for i in range(max(invocations, errors, 1)):
        aggregate.add(
            trace_id=bytes([i + 1]) * 16,
            duration_ns=(i + 1) * 1_500_000,
            is_error=i < errors,
            is_invocation=i < invocations,
            is_llm=True,
            tokens_prompt=10,
            tokens_completion=5,
            tokens_total=15,
            cost_nanos=1200,
            extra_weight=extra_weight,
        )
    return aggregate


def _writer(**kwargs: object) -> RollupWriter:
    # Nothing listens on port 9: constructing the writer must not need the server.
    options: dict[str, object] = {
        "tracking_uri": "http://127.0.0.1:9",
        "experiment_name": "unit",
        **kwargs,
    }
    return RollupWriter(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("invocations", "errors", "dimensions", "phoenix_url", "extra_weight"),
    [
        (5, 2, ("gpt-4o",), "http://phoenix.internal:6006/v1/traces", 0),
        (0, 1, (), "https://phoenix.example.com/", 0),  # no invocation: no latency in the record
        (1, 0, ("gpt-4o", "eu"), None, 0),  # no Phoenix: exemplars without links
        (3, 1, (), None, 8_999_390),  # sampled upstream at 10%: estimated counts
    ],
)
def test_window_record_matches_its_json_schema(
    invocations: int,
    errors: int,
    dimensions: tuple[str, ...],
    phoenix_url: str | None,
    extra_weight: int,
) -> None:
    writer = _writer(dimension_names=["llm.model_name", "region"], phoenix_url=phoenix_url)
    rollup = FinalRollup(
        SeriesKey("coder", dimensions),
        MAY_1 + 5 * WINDOW_MS,
        WINDOW_MS,
        _aggregate(invocations, errors, extra_weight),
        (0, 1),
        complete=True,
    )
    record = orjson.loads(orjson.dumps(writer.record(rollup)))
    jsonschema.validate(record, SCHEMA)
    assert record["step"] == (MAY_1 + 5 * WINDOW_MS) // WINDOW_MS
    assert record["window_end"] == "2024-05-01T00:06:00.000Z"
    assert record["dimensions"] == dict(zip(["llm.model_name", "region"], dimensions, strict=False))
    assert record["metrics"] == rollup.metrics()
    assert len(record["exemplars"]["slowest"]) == min(invocations, 3)
    assert len(record["exemplars"]["failed"]) == min(errors, 3)
    for exemplar in record["exemplars"]["slowest"] + record["exemplars"]["failed"]:
        if phoenix_url is None:
            assert exemplar["phoenix_url"] is None
        else:
            assert exemplar["phoenix_url"] == trace_url(
                ui_base_url(phoenix_url), exemplar["trace_id"]
            )


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("http://127.0.0.1:6006", "http://127.0.0.1:6006"),
        ("http://127.0.0.1:6006/", "http://127.0.0.1:6006"),
        ("http://phoenix:6006/v1/traces", "http://phoenix:6006"),
        ("https://example.com/phoenix/v1/traces/", "https://example.com/phoenix"),
        (" https://example.com/phoenix ", "https://example.com/phoenix"),
    ],
)
def test_phoenix_base_url_is_the_ui_not_the_otlp_endpoint(url: str, base: str) -> None:
    assert ui_base_url(url) == base
    assert trace_url(base, "0af7651916cd43dd8448eb211c80319c") == (
        f"{base}/redirects/traces/0af7651916cd43dd8448eb211c80319c"
    )


def test_phoenix_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="PROCESSOR_PHOENIX_PUBLIC_URL"):
        ui_base_url("phoenix:6006")


def test_run_names_are_agent_and_utc_day() -> None:
    late_evening = MAY_1 - 1  # 2024-04-30T23:59:59.999Z
    assert utc_day(late_evening) == "2024-04-30"
    assert run_name(SeriesKey("coder"), utc_day(MAY_1)) == "coder 2024-05-01"
    assert run_name(SeriesKey("coder", ("gpt-4o",)), "2024-05-01") == "coder gpt-4o 2024-05-01"


def test_run_keys_separate_series_days_and_window_sizes() -> None:
    keys = {
        run_key(SeriesKey("coder"), "2024-05-01", WINDOW_MS),
        run_key(SeriesKey("coder"), "2024-05-02", WINDOW_MS),
        run_key(SeriesKey("coder"), "2024-05-01", 10_000),
        run_key(SeriesKey("coder", ("gpt-4o",)), "2024-05-01", WINDOW_MS),
        run_key(SeriesKey("coder gpt-4o"), "2024-05-01", WINDOW_MS),
        run_key(SeriesKey("critic"), "2024-05-01", WINDOW_MS),
        # Quotes would break MLflow's filter string if the key carried them.
        run_key(SeriesKey("o'brien"), "2024-05-01", WINDOW_MS),
    }
    assert len(keys) == 7
    assert all(key.isalnum() for key in keys)
    assert run_key(SeriesKey("coder"), "2024-05-01", WINDOW_MS) == run_key(
        SeriesKey("coder"), "2024-05-01", WINDOW_MS
    )


def _rollups() -> list[FinalRollup]:
    return [FinalRollup(SeriesKey("coder"), MAY_1, WINDOW_MS, _aggregate(2, 1), (0,), True)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def fast_client_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    # An operator's values win over the writer's defaults; tests need no backoff.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")


def test_nothing_listening_is_retryable_and_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    writer = RollupWriter(tracking_uri=f"http://127.0.0.1:{_free_port()}", experiment_name="x")
    started = time.monotonic()
    with pytest.raises(RetryableExportError, match="MLflow write failed"):
        writer.write(_rollups())
    # MLflow's own defaults would retry for about four minutes before giving up; finalize
    # must get the failure back and apply its own backoff instead.
    assert time.monotonic() - started < 60


class _Gateway(BaseHTTPRequestHandler):
    """What stands in front of MLflow in production: a proxy answering with a fixed status."""

    status = 503

    def _answer(self) -> None:
        body = b"<html>unavailable</html>"
        self.send_response(self.status)
        if self.status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[tuple[str, type[_Gateway]]]:
    handler = type("Gateway", (_Gateway,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.usefixtures("fast_client_retries")
@pytest.mark.parametrize(
    ("status", "says"),
    [
        (503, "MLflow write failed"),
        (502, "MLflow write failed"),
        (500, "MLflow write failed"),
        (401, "MLFLOW_TRACKING_USERNAME"),
        (403, "EDIT permission"),
    ],
)
def test_gateway_errors_are_retryable_and_say_what_to_do(
    gateway: tuple[str, type[_Gateway]], status: int, says: str
) -> None:
    url, handler = gateway
    handler.status = status
    with pytest.raises(RetryableExportError, match=says):
        RollupWriter(tracking_uri=url, experiment_name="x").write(_rollups())


@pytest.mark.usefixtures("fast_client_retries")
def test_a_server_that_never_answers_times_out_as_retryable() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts connections, never answers
        port = silent.getsockname()[1]
        writer = RollupWriter(tracking_uri=f"http://127.0.0.1:{port}", experiment_name="x")
        with pytest.raises(RetryableExportError, match="Timeout"):
            writer.write(_rollups())


def test_constructor_rejects_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI"):
        RollupWriter(tracking_uri="127.0.0.1:5000", experiment_name="x")
    with pytest.raises(ValueError, match="MLFLOW_EXPERIMENT_NAME"):
        RollupWriter(tracking_uri="http://127.0.0.1:5000", experiment_name=" ")


class _RecordingFinder(importlib.abc.MetaPathFinder):
    """Notes every module the import system goes looking for."""

    def __init__(self) -> None:
        self.searched: list[str] = []

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        self.searched.append(fullname)
        return None  # the next finders search as usual


def test_the_mlflow_client_no_longer_searches_for_databricks_modules_at_every_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client imports Databricks-only modules before each request; where they are not
    installed, every attempt searched sys.path again (a fifth of a window write's CPU)."""
    for name in DATABRICKS_PROBES:
        if name in sys.modules and sys.modules[name] is None:  # left by an earlier writer
            monkeypatch.delitem(sys.modules, name)
    missing = [name for name in DATABRICKS_PROBES if importlib.util.find_spec(name) is None]
    assert missing, "this machine has every Databricks module: nothing to spare"
    for name in missing:
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name))  # restored afterwards
        del sys.modules[name]

    _writer()

    finder = _RecordingFinder()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    for name in missing:
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(name)
    assert finder.searched == []
    # and what is installed still imports
    importlib.import_module("orjson")
