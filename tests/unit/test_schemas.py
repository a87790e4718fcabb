"""The documents in schemas/ describe what the code really writes."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import orjson
import pytest

from processor.core.aggregate import WindowAggregate
from processor.core.rollup import FinalRollup, PartialRollup, PartitionProgress, SeriesKey

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
