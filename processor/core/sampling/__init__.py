"""Sampling for Phoenix: OpenTelemetry-consistent probability sampling plus tail policies.

- ``threshold``: probabilities, 56-bit rejection thresholds, ``th``/``rv`` values.
- ``tracestate``: read and update the ``ot`` entry of a W3C tracestate.
- ``policy``: the validated ``SamplingPolicy`` and the keep/drop reasons.
- ``rate_limit``: per-agent token buckets in event time.
- ``budget``: the total span budget per second of event time (``SpanBudget``).
- ``trace_sampler``: ``TraceSampler``: buffer, decide, cache.
- ``sampled_span``: a span's outcome (``SampledSpan``) and ``mark_forwarded``.

Pure: no faust, Kafka or HTTP, no wall clock. Aggregates never depend on it (every span is
counted before sampling); it only decides what Phoenix gets.
"""

from processor.core.sampling.budget import SpanBudget
from processor.core.sampling.policy import (
    DROP_BUDGET,
    DROP_NOT_SAMPLED,
    DROP_RATE_LIMITED,
    DROP_REASONS,
    KEEP_REASONS,
    REASON_ATTRIBUTE,
    REASON_ERROR,
    REASON_LATENCY,
    REASON_PROBABILISTIC,
    SamplingPolicy,
)
from processor.core.sampling.sampled_span import (
    SAMPLING_REASON_ATTRIBUTE,
    SampledSpan,
    mark_forwarded,
)
from processor.core.sampling.threshold import (
    adjusted_count,
    probability_to_threshold,
    th_to_threshold,
    threshold_to_th,
)
from processor.core.sampling.trace_sampler import SamplingStats, TraceSampler
from processor.core.sampling.tracestate import OtelTraceState, parse_tracestate, with_threshold

__all__ = [
    "DROP_BUDGET",
    "DROP_NOT_SAMPLED",
    "DROP_RATE_LIMITED",
    "DROP_REASONS",
    "KEEP_REASONS",
    "REASON_ATTRIBUTE",
    "REASON_ERROR",
    "REASON_LATENCY",
    "REASON_PROBABILISTIC",
    "SAMPLING_REASON_ATTRIBUTE",
    "OtelTraceState",
    "SampledSpan",
    "SamplingPolicy",
    "SamplingStats",
    "SpanBudget",
    "TraceSampler",
    "adjusted_count",
    "mark_forwarded",
    "parse_tracestate",
    "probability_to_threshold",
    "th_to_threshold",
    "threshold_to_th",
    "with_threshold",
]
