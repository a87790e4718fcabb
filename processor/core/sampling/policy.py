"""What the trace sampler keeps: one frozen, validated policy, and the reasons it gives.

Keep policies combine with "any keeps"; a kept span's reason is the first that applies, in the
order of ``KEEP_REASONS``. Rule-based reasons come before ``probabilistic`` so a trace that a
rule keeps is marked as kept with certainty (adjusted count 1 from this stage), whatever its
randomness: that keeps adjusted counts unbiased.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from processor.core.sampling.threshold import probability_to_threshold

REASON_ERROR = "error"
REASON_LATENCY = "latency"
REASON_ATTRIBUTE = "attribute"
REASON_PROBABILISTIC = "probabilistic"
KEEP_REASONS = (REASON_ERROR, REASON_LATENCY, REASON_ATTRIBUTE, REASON_PROBABILISTIC)
DROP_NOT_SAMPLED = "not_sampled"
DROP_BUDGET = "budget"
DROP_RATE_LIMITED = "rate_limited"
DROP_REASONS = (DROP_NOT_SAMPLED, DROP_BUDGET, DROP_RATE_LIMITED)

_SUMMARY_VALUES = 5  # values of one attribute shown in the summary before "+N more"


@dataclass(frozen=True, kw_only=True)
class SamplingPolicy:
    """Which traces go to Phoenix, and when a trace is decided. Times are event-time ms.

    ``attribute_matches`` maps a span attribute to the values that keep its trace (string
    values; a bool matches ``"true"``/``"false"``, an int its decimal form).
    ``agent_spans_per_second`` caps the spans forwarded per attributed agent (a token bucket
    holding one second's worth, at least one span, refilled by the watermark).
    ``budget_spans_per_second`` is the share of one source partition in the total budget of
    spans sent to Phoenix, per second of event time: a trace that only the probability would
    keep is kept whole if its second has room, else dropped whole (reason ``budget``); traces a
    rule keeps are always kept and use the budget too (see ``budget.SpanBudget``). A trace is
    decided once the watermark reaches its root span's end plus ``decision_grace_ms``, or its
    first-seen span's end plus ``decision_max_wait_ms``.
    """

    probability: float = 0.1
    keep_errors: bool = True
    latency_threshold_ms: int | None = None
    attribute_matches: Mapping[str, frozenset[str]] = field(default_factory=dict)
    agent_spans_per_second: float | None = None
    budget_spans_per_second: float | None = None
    decision_grace_ms: int = 2_000
    decision_max_wait_ms: int = 30_000
    max_buffered_spans: int = 200_000
    max_buffered_traces: int = 10_000
    decision_cache_size: int = 100_000
    # The rejection threshold of ``probability`` (derived, so it can never go stale).
    threshold: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self.probability
        if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p):
            raise ValueError(f"probability must be a number from 0 to 1, got {p!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability must be from 0 to 1, got {p!r}")
        if not isinstance(self.keep_errors, bool):
            raise ValueError(f"keep_errors must be true or false, got {self.keep_errors!r}")
        if self.latency_threshold_ms is not None:
            _check_int("latency_threshold_ms", self.latency_threshold_ms, minimum=0)
        matches: dict[str, frozenset[str]] = {}
        for key, values in self.attribute_matches.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"attribute_matches keys must be attribute names, got {key!r}")
            if isinstance(values, str) or not all(isinstance(v, str) for v in values):
                raise ValueError(
                    f"attribute_matches[{key!r}] must be a set of strings, got {values!r}"
                )
            if not values:
                raise ValueError(f"attribute_matches[{key!r}] is empty: it would match nothing")
            matches[key] = frozenset(values)
        # sorted by name: the summary and every iteration are the same for equal policies
        object.__setattr__(self, "attribute_matches", dict(sorted(matches.items())))
        _check_rate("agent_spans_per_second", self.agent_spans_per_second)
        _check_rate("budget_spans_per_second", self.budget_spans_per_second)
        _check_int("decision_grace_ms", self.decision_grace_ms, minimum=0)
        _check_int("decision_max_wait_ms", self.decision_max_wait_ms, minimum=0)
        _check_int("max_buffered_spans", self.max_buffered_spans, minimum=1)
        _check_int("max_buffered_traces", self.max_buffered_traces, minimum=1)
        _check_int("decision_cache_size", self.decision_cache_size, minimum=0)
        object.__setattr__(self, "threshold", probability_to_threshold(float(p)))

    @property
    def probability_only(self) -> bool:
        """Whether only the probability can keep a trace (no error, latency or attribute
        rule): a trace's randomness then decides it, on its first span, and nothing waits."""
        return (
            not self.keep_errors
            and self.latency_threshold_ms is None
            and not self.attribute_matches
        )

    def summary(self) -> str:
        """One line for the MLflow params, e.g.
        ``p=0.1; keep errors; latency>=5000ms; attr session.flagged in {true}; 50 spans/s/agent;
        budget 25 spans/s/partition``.
        """
        parts = [f"p={self.probability:g}"]
        if self.keep_errors:
            parts.append("keep errors")
        if self.latency_threshold_ms is not None:
            parts.append(f"latency>={self.latency_threshold_ms}ms")
        for key, values in self.attribute_matches.items():
            shown = sorted(values)
            listed = ",".join(shown[:_SUMMARY_VALUES])
            if len(shown) > _SUMMARY_VALUES:
                listed += f",... (+{len(shown) - _SUMMARY_VALUES} more)"
            parts.append(f"attr {key} in {{{listed}}}")
        if self.agent_spans_per_second is not None:
            parts.append(f"{self.agent_spans_per_second:g} spans/s/agent")
        if self.budget_spans_per_second is not None:
            parts.append(f"budget {self.budget_spans_per_second:g} spans/s/partition")
        return "; ".join(parts)


def _check_rate(name: str, rate: object) -> None:
    if rate is not None and (
        isinstance(rate, bool)
        or not isinstance(rate, int | float)
        or not math.isfinite(rate)
        or rate <= 0
    ):
        raise ValueError(f"{name} must be a number above 0 (or None for no limit), got {rate!r}")


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")


def _as_text(value: AnyValue) -> str | None:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "int_value":
        return str(value.int_value)
    return None


def matches_attributes(
    attributes: Iterable[KeyValue], matches: Mapping[str, frozenset[str]]
) -> bool:
    """Whether any of ``attributes`` (OTLP key-values) has a value that ``matches`` names."""
    for item in attributes:
        wanted = matches.get(item.key)
        if wanted is not None:
            text = _as_text(item.value)
            if text is not None and text in wanted:
                return True
    return False
