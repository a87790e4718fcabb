"""Per-series window aggregates: plain, serialisable state with an exact merge.

Every field is an integer count or sum (cost in 1e-9 USD), a latency sketch whose merge adds
bucket counts, or a bounded exemplar list with a deterministic order. So ``merge`` is
associative and commutative, and a partial rebuilt from the same spans serialises to the same
bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from processor.core.sketch import LatencySketch
from processor.core.spans import COST_NANOS_PER_USD, NANOS_PER_MILLI

MAX_EXEMPLARS = 3


@dataclass(slots=True)
class WindowAggregate:
    spans: int = 0
    errors: int = 0
    invocations: int = 0
    latency: LatencySketch = field(default_factory=LatencySketch)
    latency_max_ns: int = 0
    llm_calls: int = 0
    tokens_prompt: int = 0
    tokens_completion: int = 0
    tokens_total: int = 0
    cost_nanos: int = 0
    late_spans: int = 0
    sampled_spans: int = 0
    dropped_spans: int = 0
    # (duration ns, trace id hex) of the slowest invocations, slowest first
    slowest: list[tuple[int, str]] = field(default_factory=list)
    # trace ids (hex) of failed spans, smallest first: any fixed order merges exactly
    failed: list[str] = field(default_factory=list)

    def add(
        self,
        *,
        trace_id: bytes,
        duration_ns: int,
        is_error: bool,
        is_invocation: bool,
        is_llm: bool,
        tokens_prompt: int,
        tokens_completion: int,
        tokens_total: int,
        cost_nanos: int,
        exemplars: bool = True,
    ) -> None:
        """Count one span. ``exemplars=False`` leaves the exemplar lists to ``note_exemplar``
        (the caller then names only traces that Phoenix will have)."""
        self.spans += 1
        if is_error:
            self.errors += 1
        if is_invocation:
            self.invocations += 1
            self.latency.add(duration_ns / NANOS_PER_MILLI)
            if duration_ns > self.latency_max_ns:
                self.latency_max_ns = duration_ns
        if exemplars:
            self.note_exemplar(
                trace_id=trace_id,
                duration_ns=duration_ns,
                is_error=is_error,
                is_invocation=is_invocation,
            )
        if is_llm:
            self.llm_calls += 1
            self.tokens_prompt += tokens_prompt
            self.tokens_completion += tokens_completion
            self.tokens_total += tokens_total
            self.cost_nanos += cost_nanos

    def note_exemplar(
        self, *, trace_id: bytes, duration_ns: int, is_error: bool, is_invocation: bool
    ) -> None:
        """Offer a span's trace as an exemplar: among the failed, or the slowest invocations."""
        if is_error:
            _keep_smallest(self.failed, trace_id.hex())
        if is_invocation:
            _keep_slowest(self.slowest, (duration_ns, trace_id.hex()))

    def merge(self, other: WindowAggregate) -> None:
        self.spans += other.spans
        self.errors += other.errors
        self.invocations += other.invocations
        self.latency.merge(other.latency)
        self.latency_max_ns = max(self.latency_max_ns, other.latency_max_ns)
        self.llm_calls += other.llm_calls
        self.tokens_prompt += other.tokens_prompt
        self.tokens_completion += other.tokens_completion
        self.tokens_total += other.tokens_total
        self.cost_nanos += other.cost_nanos
        self.late_spans += other.late_spans
        self.sampled_spans += other.sampled_spans
        self.dropped_spans += other.dropped_spans
        for item in other.slowest:
            _keep_slowest(self.slowest, item)
        for trace in other.failed:
            _keep_smallest(self.failed, trace)

    def metrics(self) -> dict[str, float]:
        """The rollup's metric values, named as in ``schemas/metrics.md``."""
        values: dict[str, float] = {
            "spans": self.spans,
            "errors": self.errors,
            "error_rate": self.errors / self.spans if self.spans else 0.0,
            "invocations": self.invocations,
            "llm_calls": self.llm_calls,
            "tokens_prompt": self.tokens_prompt,
            "tokens_completion": self.tokens_completion,
            "tokens_total": self.tokens_total,
            "cost_usd": self.cost_nanos / COST_NANOS_PER_USD,
            "late_spans": self.late_spans,
            "sampled_spans": self.sampled_spans,
            "dropped_spans": self.dropped_spans,
        }
        if self.invocations:
            for name, q in (
                ("latency_p50_ms", 0.5),
                ("latency_p95_ms", 0.95),
                ("latency_p99_ms", 0.99),
            ):
                value = self.latency.quantile(q)
                if value is not None:
                    # Not rounded: any fixed rounding adds to the sketch's 1% relative error,
                    # and a number of decimals breaks it outright below a millisecond.
                    values[name] = value
            values["latency_max_ms"] = self.latency_max_ns / NANOS_PER_MILLI
        return values

    def to_state(self) -> dict[str, Any]:
        return {
            "spans": self.spans,
            "errors": self.errors,
            "invocations": self.invocations,
            "latency": self.latency.to_state(),
            "latency_max_ns": self.latency_max_ns,
            "llm_calls": self.llm_calls,
            "tokens_prompt": self.tokens_prompt,
            "tokens_completion": self.tokens_completion,
            "tokens_total": self.tokens_total,
            "cost_nanos": self.cost_nanos,
            "late_spans": self.late_spans,
            "sampled_spans": self.sampled_spans,
            "dropped_spans": self.dropped_spans,
            "slowest": [list(item) for item in self.slowest],
            "failed": list(self.failed),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> WindowAggregate:
        return cls(
            spans=state["spans"],
            errors=state["errors"],
            invocations=state["invocations"],
            latency=LatencySketch.from_state(state["latency"]),
            latency_max_ns=state["latency_max_ns"],
            llm_calls=state["llm_calls"],
            tokens_prompt=state["tokens_prompt"],
            tokens_completion=state["tokens_completion"],
            tokens_total=state["tokens_total"],
            cost_nanos=state["cost_nanos"],
            late_spans=state["late_spans"],
            sampled_spans=state["sampled_spans"],
            dropped_spans=state["dropped_spans"],
            slowest=[(int(d), str(t)) for d, t in state["slowest"]],
            failed=list(state["failed"]),
        )


def _keep_slowest(slowest: list[tuple[int, str]], item: tuple[int, str]) -> None:
    if len(slowest) >= MAX_EXEMPLARS:
        worst = slowest[-1]
        if item[0] < worst[0] or (item[0] == worst[0] and item[1] >= worst[1]):
            return
    if item in slowest:
        return
    slowest.append(item)
    # slowest first; ties broken by trace id so every merge order picks the same ones
    slowest.sort(key=lambda pair: (-pair[0], pair[1]))
    del slowest[MAX_EXEMPLARS:]


def _keep_smallest(failed: list[str], trace: str) -> None:
    if trace in failed:
        return
    if len(failed) >= MAX_EXEMPLARS and trace >= failed[-1]:
        return
    failed.append(trace)
    failed.sort()
    del failed[MAX_EXEMPLARS:]
