"""The worker's log lines: text or JSON, with worker id and context, and never a secret."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from processor.worker.logging_setup import (
    MASK,
    JsonFormatter,
    RecentProblems,
    SecretMasker,
    TextFormatter,
    WorkerContext,
)

KEY = "phx-0123456789abcdef"


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(WorkerContext("host-a-1"))
    log = logging.getLogger(f"test.observability.{id(stream)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield log, stream, handler
    log.removeHandler(handler)


def test_json_lines_carry_worker_id_and_context(logger: tuple) -> None:
    log, stream, handler = logger
    handler.setFormatter(JsonFormatter(SecretMasker([KEY])))
    log.warning("dead letter from partition %d: %s", 3, "bad", extra={"partition": 3, "offset": 41})
    entry = json.loads(stream.getvalue())
    assert entry["worker_id"] == "host-a-1"
    assert entry["level"] == "warning"
    assert entry["message"] == "dead letter from partition 3: bad"
    assert (entry["partition"], entry["offset"]) == (3, 41)
    assert entry["ts"].endswith("+00:00")


@pytest.mark.parametrize(
    ("message", "leak"),
    [
        (f"sending with key {KEY}", KEY),
        ("headers {'authorization': 'Bearer abc.def-123'}", "abc.def-123"),
        ("MLflow at https://bob:hunter2@mlflow.example.com failed", "hunter2"),
    ],
)
@pytest.mark.parametrize("formatter", [JsonFormatter, TextFormatter])
def test_no_secret_reaches_a_line(
    logger: tuple, formatter: type[logging.Formatter], message: str, leak: str
) -> None:
    log, stream, handler = logger
    handler.setFormatter(formatter(SecretMasker([KEY])))  # type: ignore[call-arg]
    try:
        raise RuntimeError(message)
    except RuntimeError:
        log.exception("%s", message)
    line = stream.getvalue()
    assert leak not in line
    assert MASK in line


def test_text_lines_append_context(logger: tuple) -> None:
    log, stream, handler = logger
    handler.setFormatter(TextFormatter())
    log.info("wrote window", extra={"agent": "planner", "window_start_ms": 60_000})
    line = stream.getvalue().strip()
    assert "[host-a-1]" in line
    assert line.endswith("wrote window agent=planner window_start_ms=60000")


def test_recent_problems_keeps_warnings_and_errors_only() -> None:
    recent = RecentProblems(maxlen=2)
    recent.use_masker(SecretMasker([KEY]))
    log = logging.getLogger("test.observability.recent")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.addHandler(recent)
    try:
        log.info("fine")
        log.warning("first")
        log.error("second %s", KEY, extra={"partition": 1})
        log.error("third")
    finally:
        log.removeHandler(recent)
    snapshot = recent.snapshot()
    assert [entry["message"] for entry in snapshot] == [f"second {MASK}", "third"]
    assert snapshot[0]["partition"] == 1


def test_configure_logging_in_a_worker_process_writes_masked_json() -> None:
    # A separate interpreter: dictConfig replaces the root logger's handlers for good.
    script = """
import logging, os
from processor.settings import WorkerSettings
from processor.worker.logging_setup import configure_logging
settings = WorkerSettings(log_format="json", worker_id="w-7")
config = configure_logging(settings)
logging.getLogger("processor.worker.aggregate").warning(
    "key %s", os.environ["PHOENIX_API_KEY"], extra={"partition": 2})
logging.getLogger("httpx").info("HTTP Request: POST ...")
import logging.config
logging.config.dictConfig(config)  # what mode does when the worker starts
logging.getLogger("x").info("after the worker took over")
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PHOENIX_API_KEY": KEY, "PATH": "/usr/bin:/bin"},
        check=True,
    )
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(e["logger"], e["message"], e.get("partition")) for e in lines] == [
        ("processor.worker.aggregate", f"key {MASK}", 2),
        ("x", "after the worker took over", None),
    ]
    assert {e["worker_id"] for e in lines} == {"w-7"}
