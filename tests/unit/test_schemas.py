"""The documents in schemas/ describe what the code really writes."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import orjson
import pytest

from processor.alert_rules import DEFAULT_RULES, AlertRule
from processor.core.aggregate import WindowAggregate
from processor.core.alerts import AlertEvaluator
from processor.core.rollup import FinalRollup, PartialRollup, PartitionProgress, SeriesKey
from processor.worker.alerting import alert_document

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def _aggregate(upstream: bool = False) -> WindowAggregate:
    """Five spans; with ``upstream``, the LLM ones came sampled at 50% upstream."""
    aggregate = WindowAggregate()
    for i in range(5):
        aggregate.add(
            trace_id=bytes([i + 1]) * 16,
            duration_ns=(i + 1) * 1_000_000,
            is_error=i == 2,
            is_invocation=True,
            is_llm=i % 2 == 0,
            tokens_prompt=10,
            tokens_completion=5,
            tokens_total=15,
            cost_nanos=1200,
            extra_weight=1_000_000 if upstream and i % 2 == 0 else 0,
        )
    return aggregate


@pytest.mark.parametrize("upstream", [False, True])
def test_partial_and_progress_records_match_the_json_schema(upstream: bool) -> None:
    schema = orjson.loads((SCHEMAS / "partial-rollup.schema.json").read_bytes())
    aggregate = _aggregate(upstream)
    partial = PartialRollup(SeriesKey("coder", ("gpt-4o",)), 60_000, 60_000, 3, aggregate)
    jsonschema.validate(orjson.loads(partial.to_bytes()), schema)
    jsonschema.validate(orjson.loads(PartitionProgress(3, 120_000).to_bytes()), schema)


def test_every_metric_written_to_mlflow_is_documented() -> None:
    documented = set(
        re.findall(r"^\| `([a-z0-9_]+)` \|", (SCHEMAS / "metrics.md").read_text(), re.M)
    )
    final = FinalRollup(SeriesKey("coder"), 0, 60_000, _aggregate(), (0, 1), complete=True)
    assert set(final.metrics()) == documented


def test_alert_events_match_their_json_schema() -> None:
    schema = orjson.loads((SCHEMAS / "alert.schema.json").read_bytes())
    evaluator = AlertEvaluator(
        [
            *DEFAULT_RULES,
            AlertRule(name="silent", kind="silent", agent="coder", silent_windows=1),
        ],
        ["model"],
    )
    failing = WindowAggregate()
    for i in range(30):
        failing.add(
            trace_id=bytes([i + 1]) * 16,
            duration_ns=6_000_000_000,
            is_error=i < 10,
            is_invocation=True,
            is_llm=False,
            tokens_prompt=0,
            tokens_completion=0,
            tokens_total=0,
            cost_nanos=0,
        )
        failing.note_exemplar(
            trace_id=bytes([i + 1]) * 16,
            duration_ns=6_000_000_000,
            is_error=i < 10,
            is_invocation=True,
        )
    series = SeriesKey("coder", ("gpt-4o",))
    events = []
    for step in range(3):
        events += evaluator.observe(FinalRollup(series, step * 60_000, 60_000, failing, (0,), True))
    events += evaluator.close(10 * 60_000)  # silent from window 3 on
    events += evaluator.observe(FinalRollup(series, 5 * 60_000, 60_000, _aggregate(), (0,), True))
    assert {(e.rule, e.state) for e in events} == {
        ("error-rate", "firing"),
        ("slow-p95", "firing"),
        ("silent", "firing"),
        ("silent", "resolved"),
        ("slow-p95", "resolved"),  # error-rate stays: 5 spans are under its min_spans
    }
    for event, run_id in zip(events, ["run-1", None, "run-1", None, "run-2"], strict=True):
        document = alert_document(
            event,
            run_id=run_id,
            dimension_names=["model"],
            link=lambda trace: f"http://127.0.0.1:6006/redirects/traces/{trace}",
        )
        jsonschema.validate(document, schema)
        assert document["dimensions"] == {"model": "gpt-4o"}
