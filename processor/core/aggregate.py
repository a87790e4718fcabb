"""Per-series window aggregates: plain, serialisable state with an exact merge.

Every field is an integer count or sum (cost in 1e-9 USD), a latency sketch whose merge adds
bucket counts, or a bounded exemplar list with a deterministic order. So ``merge`` is
associative and commutative, and a partial rebuilt from the same spans serialises to the same
bytes.

Spans that an upstream sampler kept stand for more than one span (their adjusted count, from
the ``th`` of their tracestate). The plain fields count spans as received; what the adjusted
counts add on top is kept in ``upstream`` (counts in millionths of a span, tokens and cost in
their own units, rounded per span), so data without upstream sampling gives exactly the
integers it always did, and the metrics say when they are estimates (``counts_adjusted``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from processor.core.sketch import WEIGHT_ONE, LatencySketch
from processor.core.spans import COST_NANOS_PER_USD, NANOS_PER_MILLI

MAX_EXEMPLARS = 3

# Keys of ``WindowAggregate.upstream``: how many spans came sampled upstream, and the weight
# above one they add. Counts are in millionths of a span (``WEIGHT_ONE``); tokens and cost
# are in their own units, rounded per span.
UPSTREAM_SPANS = "sampled_spans"
_UPSTREAM_COUNTS = ("spans", "errors", "invocations", "llm_calls")
_UPSTREAM_AMOUNTS = (
    "tokens_prompt",
    "tokens_completion",
    "tokens_total",
    "cost_nanos",
    "tokens_cache_read",
    "tokens_cache_write",
    "tokens_reasoning",
    "cost_estimated_nanos",
)


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
    # parts of the prompt and completion tokens, and of the cost: the part priced by the table
    tokens_cache_read: int = 0
    tokens_cache_write: int = 0
    tokens_reasoning: int = 0
    cost_estimated_nanos: int = 0
    unpriced_llm_calls: int = 0  # LLM spans with tokens that no price table knew
    late_spans: int = 0
    # copies of spans counted already (a producer delivered them twice): not counted again
    duplicate_spans: int = 0
    sampled_spans: int = 0
    dropped_spans: int = 0
    # (duration ns, trace id hex) of the slowest invocations, slowest first
    slowest: list[tuple[int, str]] = field(default_factory=list)
    # trace ids (hex) of failed spans, smallest first: any fixed order merges exactly
    failed: list[str] = field(default_factory=list)
    # what upstream sampling adds to the counts above (see the module doc); empty without it
    upstream: dict[str, int] = field(default_factory=dict)

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
        tokens_cache_read: int = 0,
        tokens_cache_write: int = 0,
        tokens_reasoning: int = 0,
        cost_estimated_nanos: int = 0,
        unpriced: bool = False,
        exemplars: bool = True,
        extra_weight: int = 0,
    ) -> None:
        """Count one span. ``exemplars=False`` leaves the exemplar lists to ``note_exemplar``
        (the caller then names only traces that Phoenix will have). ``extra_weight`` is the
        span's adjusted count minus one, in millionths: non-zero when sampled upstream."""
        self.spans += 1
        if is_error:
            self.errors += 1
        if extra_weight:
            self._add_upstream(
                extra_weight,
                is_error=is_error,
                is_invocation=is_invocation,
                is_llm=is_llm,
                amounts=(
                    tokens_prompt,
                    tokens_completion,
                    tokens_total,
                    cost_nanos,
                    tokens_cache_read,
                    tokens_cache_write,
                    tokens_reasoning,
                    cost_estimated_nanos,
                ),
            )
        if is_invocation:
            self.invocations += 1
            self.latency.add(duration_ns / NANOS_PER_MILLI, extra_weight)
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
            if tokens_cache_read:
                self.tokens_cache_read += tokens_cache_read
            if tokens_cache_write:
                self.tokens_cache_write += tokens_cache_write
            if tokens_reasoning:
                self.tokens_reasoning += tokens_reasoning
            if cost_estimated_nanos:
                self.cost_estimated_nanos += cost_estimated_nanos
            if unpriced:
                self.unpriced_llm_calls += 1

    def _add_upstream(
        self,
        extra_weight: int,
        *,
        is_error: bool,
        is_invocation: bool,
        is_llm: bool,
        amounts: tuple[int, ...],
    ) -> None:
        upstream = self.upstream
        upstream[UPSTREAM_SPANS] = upstream.get(UPSTREAM_SPANS, 0) + 1
        for name, applies in zip(
            _UPSTREAM_COUNTS, (True, is_error, is_invocation, is_llm), strict=True
        ):
            if applies:
                upstream[name] = upstream.get(name, 0) + extra_weight
        if is_llm:
            for name, amount in zip(_UPSTREAM_AMOUNTS, amounts, strict=True):
                if amount:
                    # rounded half up per span: integer sums merge exactly in any order
                    extra = (amount * extra_weight + WEIGHT_ONE // 2) // WEIGHT_ONE
                    upstream[name] = upstream.get(name, 0) + extra

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
        self.tokens_cache_read += other.tokens_cache_read
        self.tokens_cache_write += other.tokens_cache_write
        self.tokens_reasoning += other.tokens_reasoning
        self.cost_estimated_nanos += other.cost_estimated_nanos
        self.unpriced_llm_calls += other.unpriced_llm_calls
        self.late_spans += other.late_spans
        self.duplicate_spans += other.duplicate_spans
        self.sampled_spans += other.sampled_spans
        self.dropped_spans += other.dropped_spans
        for item in other.slowest:
            _keep_slowest(self.slowest, item)
        for trace in other.failed:
            _keep_smallest(self.failed, trace)
        for name, value in other.upstream.items():
            self.upstream[name] = self.upstream.get(name, 0) + value

    def metrics(self) -> dict[str, float]:
        """The rollup's metric values, named as in ``schemas/metrics.md``.

        With upstream sampling the counts, tokens and cost are estimates: sums of adjusted
        counts (``counts_adjusted`` is 1). Bookkeeping counts stay counts of spans received."""
        upstream = self.upstream

        def count(name: str, plain: int) -> float:
            # plain integers unless spans came sampled upstream
            return plain + upstream[name] / WEIGHT_ONE if name in upstream else plain

        def amount(name: str, plain: int) -> int:
            return plain + upstream.get(name, 0)

        spans = count("spans", self.spans)
        cost = amount("cost_nanos", self.cost_nanos)
        estimated = amount("cost_estimated_nanos", self.cost_estimated_nanos)
        errors = count("errors", self.errors)
        values: dict[str, float] = {
            "spans": spans,
            "errors": errors,
            "error_rate": errors / spans if spans else 0.0,
            "invocations": count("invocations", self.invocations),
            "llm_calls": count("llm_calls", self.llm_calls),
            "tokens_prompt": amount("tokens_prompt", self.tokens_prompt),
            "tokens_completion": amount("tokens_completion", self.tokens_completion),
            "tokens_total": amount("tokens_total", self.tokens_total),
            "tokens_cache_read": amount("tokens_cache_read", self.tokens_cache_read),
            "tokens_cache_write": amount("tokens_cache_write", self.tokens_cache_write),
            "tokens_reasoning": amount("tokens_reasoning", self.tokens_reasoning),
            "cost_usd": cost / COST_NANOS_PER_USD,
            "cost_reported_usd": (cost - estimated) / COST_NANOS_PER_USD,
            "cost_estimated_usd": estimated / COST_NANOS_PER_USD,
            "unpriced_llm_calls": self.unpriced_llm_calls,
            "late_spans": self.late_spans,
            "duplicate_spans": self.duplicate_spans,
            "sampled_spans": self.sampled_spans,
            "dropped_spans": self.dropped_spans,
            "upstream_sampled_spans": upstream.get(UPSTREAM_SPANS, 0),
            "counts_adjusted": 1.0 if upstream else 0.0,
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
        state = self._plain_state()
        if self.upstream:  # absent without upstream sampling: such partials keep their bytes
            state["upstream"] = dict(self.upstream)
            state["latency_upstream"] = self.latency.extra_state() or [[0]]
        return state

    def _plain_state(self) -> dict[str, Any]:
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
            "tokens_cache_read": self.tokens_cache_read,
            "tokens_cache_write": self.tokens_cache_write,
            "tokens_reasoning": self.tokens_reasoning,
            "cost_estimated_nanos": self.cost_estimated_nanos,
            "unpriced_llm_calls": self.unpriced_llm_calls,
            "late_spans": self.late_spans,
            "duplicate_spans": self.duplicate_spans,
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
            latency=LatencySketch.from_state(state["latency"], state.get("latency_upstream")),
            latency_max_ns=state["latency_max_ns"],
            llm_calls=state["llm_calls"],
            tokens_prompt=state["tokens_prompt"],
            tokens_completion=state["tokens_completion"],
            tokens_total=state["tokens_total"],
            cost_nanos=state["cost_nanos"],
            # absent from partials written before these were counted
            tokens_cache_read=state.get("tokens_cache_read", 0),
            tokens_cache_write=state.get("tokens_cache_write", 0),
            tokens_reasoning=state.get("tokens_reasoning", 0),
            cost_estimated_nanos=state.get("cost_estimated_nanos", 0),
            unpriced_llm_calls=state.get("unpriced_llm_calls", 0),
            late_spans=state["late_spans"],
            duplicate_spans=state.get("duplicate_spans", 0),  # absent from older partials
            sampled_spans=state["sampled_spans"],
            dropped_spans=state["dropped_spans"],
            slowest=[(int(d), str(t)) for d, t in state["slowest"]],
            failed=list(state["failed"]),
            upstream={str(name): int(value) for name, value in state.get("upstream", {}).items()},
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
