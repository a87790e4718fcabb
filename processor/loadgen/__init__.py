"""Demo traffic with ground truth: LangChain/LangGraph-style agent traces published to Kafka as
OTLP, and the exact per-agent window rollups the processor should produce from them (with
the all-agents series, hourly totals and each day's running totals).

Pure parts (scenario, trace shapes, OTLP encoding, truth, late ordering) take a seed and
explicit times; only `publish_traces` does I/O.

Generator speed, one core (upb protobuf): about 70k spans/s for 20-span traces and 85k spans/s
for 100-span traces, most of it spent filling protobuf messages; with truth, about 50k spans/s.
Trace ``i`` depends only on the seed, ``i`` and its end time, so ranges of traces
(`TraceGenerator.generate(count, first_index=...)`) can be made in parallel processes.
"""

from processor.loadgen.late_order import LateReorderer
from processor.loadgen.publisher import PublishStats, ensure_topic, publish_traces
from processor.loadgen.redelivery import Delivery, Redelivery, with_redeliveries
from processor.loadgen.scenario import AgentProfile, Scenario, llm_cost_usd
from processor.loadgen.traces import GeneratedTrace, TraceGenerator
from processor.loadgen.truth import (
    DaySoFar,
    Rollup,
    Truth,
    TruthBuilder,
    lower_quantile,
    window_start_ms,
)
from processor.loadgen.upstream import UpstreamSampler

__all__ = [
    "AgentProfile",
    "DaySoFar",
    "Delivery",
    "GeneratedTrace",
    "LateReorderer",
    "PublishStats",
    "Redelivery",
    "Rollup",
    "Scenario",
    "TraceGenerator",
    "Truth",
    "TruthBuilder",
    "UpstreamSampler",
    "ensure_topic",
    "llm_cost_usd",
    "lower_quantile",
    "publish_traces",
    "window_start_ms",
    "with_redeliveries",
]
