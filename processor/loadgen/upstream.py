"""Upstream sampling, as an agent's own SDK or a Collector would do it before Kafka.

``UpstreamSampler`` keeps a trace when its trace id's randomness clears the threshold of the
probability (OpenTelemetry's consistent probability sampling) and writes the threshold into
every span's tracestate (``ot=th:...``), so the processor can scale counts back up. The truth
of a run is built from every generated trace; only the kept ones are published.
"""

from __future__ import annotations

from dataclasses import replace

from processor.core.sampling.threshold import (
    probability_to_threshold,
    threshold_to_th,
    trace_id_randomness,
)
from processor.core.sampling.tracestate import with_threshold
from processor.loadgen.traces import GeneratedTrace


class UpstreamSampler:
    def __init__(self, probability: float) -> None:
        if not 0.0 < probability <= 1.0:
            raise ValueError(f"probability must be in (0, 1], got {probability!r}")
        self.threshold = probability_to_threshold(probability, precision=4)
        self.th = threshold_to_th(self.threshold)

    def sample(self, trace: GeneratedTrace) -> GeneratedTrace | None:
        """The trace as published after upstream sampling, or None when it is dropped."""
        if trace_id_randomness(trace.trace_id) < self.threshold:
            return None
        request = type(trace.request)()
        request.CopyFrom(trace.request)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    span.trace_state = with_threshold(span.trace_state, self.threshold)
        return replace(trace, request=request, payload=request.SerializeToString())
