"""The exact rollups the processor should produce for a set of generated traces.

Computed from the OTLP requests as published, by the product's rules, with code that shares
nothing with ``processor.core`` but its price table (a lookup in genai-prices' catalogue, not a
rule): when the two disagree, one of them has a bug worth finding.

The rules, per (agent, tumbling window of ``window_size_ms``):

- a span belongs to the window holding its end time, ``(end_ns // 10**6) // W * W``, half-open;
- its agent is its own ``agent.name``, else its nearest ancestor's, else the resource's
  ``service.name``, else ``"unknown"``;
- ``spans``/``errors`` count all its spans (any kind) and those with status ERROR;
- an *invocation* is one of its spans whose parent is absent or belongs to another agent;
  latency percentiles are exact order statistics of invocation latencies, "lower" rule:
  ``sorted(v)[floor(q * (n - 1))]``; ``null`` when the window holds no invocation;
- ``llm_calls``, tokens and costs sum its LLM spans only (span kind ``LLM``, or a GenAI
  ``gen_ai.operation.name`` of one model call), so token totals repeated on CHAIN spans are not
  counted twice. Tokens are OpenInference's counts, else the GenAI ones; a total missing (or 0)
  is prompt + completion. ``tokens_cache_read``/``_cache_write``/``_reasoning`` are parts of
  the prompt and completion counts, not additions;
- an LLM span's cost is its ``llm.cost.total`` when it has one (``cost_reported_usd``), else
  its price in genai-prices' table at the span's end time (``cost_estimated_usd``), as the
  worker prices it by default (no prices file, catalogue on); ``cost_usd`` is their sum. Costs
  are summed in integer nano-USD (each span's rounded half up), so sums are exact in any
  order. An LLM span with tokens that neither prices counts in ``unpriced_llm_calls``;
- a span delivered more than once (same trace id and span id) counts once; each extra copy
  counts in ``duplicate_spans`` of the span's agent and window.

Every span also counts, in the same window and by the same rules, in the series of the agent
``ALL_AGENTS`` (``"__all__"``): its sums are the sums over the agents of that window and its
latencies the union of every agent's invocation latencies.

Two calendar views are built from those windows, per agent (``ALL_AGENTS`` included):

- ``hours``: the totals over the agent's windows whose *start* lies in a UTC hour, as a rollup
  whose window is that hour (``[hour, hour + 1 h)``);
- ``days_so_far``: one entry per window rollup, the totals over the agent's windows of the
  same UTC day (of the window start) up to and including this one, so the last window of a day
  holds the day's total.

Their percentiles are order statistics of the union of the latencies they cover, by the same
"lower" rule, never averages of the windows' percentiles.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, Protocol, TypedDict

import orjson
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from processor.core.pricing import PriceTable
from processor.core.rollup import ALL_AGENTS
from processor.loadgen.traces import GeneratedTrace

_NS_PER_MS = 1_000_000
_MS_PER_HOUR = 3_600_000
_MS_PER_DAY = 86_400_000
_NANOS_PER_USD = 1_000_000_000
UNKNOWN_AGENT = "unknown"
# GenAI operations that are one model call, so an LLM span without an OpenInference kind.
_GENAI_LLM_OPERATIONS = frozenset({"chat", "text_completion", "generate_content", "completion"})
# Where the conventions put usage, model and provider: OpenInference's name first.
_PROMPT = ("llm.token_count.prompt", "gen_ai.usage.input_tokens")
_COMPLETION = ("llm.token_count.completion", "gen_ai.usage.output_tokens")
_CACHE_READ = ("llm.token_count.prompt_details.cache_read", "gen_ai.usage.cache_read.input_tokens")
_CACHE_WRITE = (
    "llm.token_count.prompt_details.cache_write",
    "gen_ai.usage.cache_creation.input_tokens",
)
_REASONING = (
    "llm.token_count.completion_details.reasoning",
    "gen_ai.usage.reasoning.output_tokens",
)
_MODEL = (
    "llm.model_name",
    "llm.response.model_name",
    "gen_ai.response.model",
    "gen_ai.request.model",
)
_PROVIDER = ("llm.provider", "gen_ai.provider.name", "gen_ai.system")


class Rollup(TypedDict):
    """One agent's numbers for one window, as written to the truth file."""

    agent: str
    window_start_ms: int
    window_end_ms: int
    spans: int
    errors: int
    error_rate: float
    invocations: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    latency_max_ms: float | None
    llm_calls: int
    tokens_prompt: int
    tokens_completion: int
    tokens_total: int
    tokens_cache_read: int
    tokens_cache_write: int
    tokens_reasoning: int
    cost_usd: float
    cost_reported_usd: float
    cost_estimated_usd: float
    unpriced_llm_calls: int
    duplicate_spans: int


class DaySoFar(Rollup):
    """One agent's totals over its windows of a UTC day up to and including one window.

    ``window_start_ms``/``window_end_ms`` are that window's; ``day_start_ms`` is the UTC
    midnight of its start."""

    day_start_ms: int


class LateTrace(TypedDict):
    """A trace published after traces with later event times (``--late-fraction``)."""

    trace_id: str
    end_ms: int
    delay_ms: int


def window_start_ms(end_time_unix_nano: int, window_size_ms: int) -> int:
    """Start of the window holding this end time; a span ending on a boundary opens the next."""
    return (end_time_unix_nano // _NS_PER_MS) // window_size_ms * window_size_ms


class _Ranked(Protocol):
    """Sorted values, looked up by rank: a sorted list, or `_SortedLatencies`."""

    def __len__(self) -> int: ...

    def __getitem__(self, rank: int, /) -> float: ...


def lower_quantile(sorted_values: _Ranked, percent: int) -> float:
    """``sorted_values[floor(percent / 100 * (n - 1))]``, the index computed in integers so
    that no float rounding moves it (0.95 * 20 must be 19, not 18.999...)."""
    return sorted_values[percent * (len(sorted_values) - 1) // 100]


_BLOCK = 1_000


class _SortedLatencies:
    """A growing multiset of latencies kept sorted in blocks of ``_BLOCK`` to ``2 * _BLOCK``
    values (as sortedcontainers' SortedList does), so that a value is added in O(log n) and
    looked up by rank in O(n / _BLOCK) at worst: a day's running percentiles, read after
    each of its windows, then cost about a sort of the day, not a sort of the day per window.
    """

    __slots__ = ("_blocks", "_ends", "_maxes", "_size")

    def __init__(self) -> None:
        self._blocks: list[list[float]] = []
        self._maxes: list[float] = []  # each block's last value
        self._ends: list[int] | None = None  # each block's end rank, once asked for
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def update(self, values: Iterable[float]) -> None:
        blocks, maxes = self._blocks, self._maxes
        for value in values:
            self._size += 1
            if not blocks:
                blocks.append([value])
                maxes.append(value)
                continue
            # The first block whose last value is >= value, else the last block.
            index = bisect_left(maxes, value)
            if index == len(maxes):
                index -= 1
                blocks[index].append(value)
                maxes[index] = value
            else:
                insort(blocks[index], value)
            block = blocks[index]
            if len(block) > 2 * _BLOCK:
                blocks[index : index + 1] = [block[:_BLOCK], block[_BLOCK:]]
                maxes.insert(index, block[_BLOCK - 1])
        self._ends = None

    def __getitem__(self, rank: int, /) -> float:
        if rank < 0:
            rank += self._size
        if not 0 <= rank < self._size:
            raise IndexError(rank)
        if self._ends is None:
            self._ends = list(accumulate(map(len, self._blocks)))
        index = bisect_right(self._ends, rank)
        return self._blocks[index][rank - (self._ends[index - 1] if index else 0)]


@dataclass(slots=True)
class _WindowTotals:
    spans: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    llm_calls: int = 0
    tokens_prompt: int = 0
    tokens_completion: int = 0
    tokens_total: int = 0
    tokens_cache_read: int = 0
    tokens_cache_write: int = 0
    tokens_reasoning: int = 0
    # Integer nano-USD, as the worker sums them: exact in any order.
    cost_nanos: int = 0
    cost_estimated_nanos: int = 0
    unpriced_llm_calls: int = 0
    duplicate_spans: int = 0

    def add_llm_call(self, facts: _SpanFacts, cost_nanos: int | None, estimated: bool) -> None:
        """Count one LLM span; ``cost_nanos`` None: no price for it."""
        self.llm_calls += 1
        self.tokens_prompt += facts.tokens_prompt
        self.tokens_completion += facts.tokens_completion
        self.tokens_total += facts.tokens_total
        self.tokens_cache_read += facts.tokens_cache_read
        self.tokens_cache_write += facts.tokens_cache_write
        self.tokens_reasoning += facts.tokens_reasoning
        if cost_nanos is None:
            # A failed call reports no tokens: it costs nothing rather than lacking a price.
            if facts.tokens_total > 0:
                self.unpriced_llm_calls += 1
            return
        self.cost_nanos += cost_nanos
        if estimated:
            self.cost_estimated_nanos += cost_nanos

    def merge(self, other: _WindowTotals, *, latencies: bool = True) -> None:
        """Add ``other``'s counts to these, and its latencies unless ``latencies`` is false
        (``other`` is unchanged)."""
        self.spans += other.spans
        self.errors += other.errors
        if latencies:
            self.latencies_ms.extend(other.latencies_ms)
        self.llm_calls += other.llm_calls
        self.tokens_prompt += other.tokens_prompt
        self.tokens_completion += other.tokens_completion
        self.tokens_total += other.tokens_total
        self.tokens_cache_read += other.tokens_cache_read
        self.tokens_cache_write += other.tokens_cache_write
        self.tokens_reasoning += other.tokens_reasoning
        self.cost_nanos += other.cost_nanos
        self.cost_estimated_nanos += other.cost_estimated_nanos
        self.unpriced_llm_calls += other.unpriced_llm_calls
        self.duplicate_spans += other.duplicate_spans

    def to_rollup(
        self,
        agent: str,
        start_ms: int,
        window_size_ms: int,
        latencies: _Ranked | None = None,
    ) -> Rollup:
        """These totals as the rollup of ``[start_ms, start_ms + window_size_ms)``, with
        ``latencies`` (sorted) if given, else ``latencies_ms``, sorted in place."""
        if latencies is None:
            self.latencies_ms.sort()
            latencies = self.latencies_ms
        return Rollup(
            agent=agent,
            window_start_ms=start_ms,
            window_end_ms=start_ms + window_size_ms,
            spans=self.spans,
            errors=self.errors,
            error_rate=self.errors / self.spans,
            invocations=len(latencies),
            latency_p50_ms=lower_quantile(latencies, 50) if latencies else None,
            latency_p95_ms=lower_quantile(latencies, 95) if latencies else None,
            latency_p99_ms=lower_quantile(latencies, 99) if latencies else None,
            latency_max_ms=latencies[-1] if latencies else None,
            llm_calls=self.llm_calls,
            tokens_prompt=self.tokens_prompt,
            tokens_completion=self.tokens_completion,
            tokens_total=self.tokens_total,
            tokens_cache_read=self.tokens_cache_read,
            tokens_cache_write=self.tokens_cache_write,
            tokens_reasoning=self.tokens_reasoning,
            # The worker's arithmetic, so the floats come out the same as well.
            cost_usd=self.cost_nanos / _NANOS_PER_USD,
            cost_reported_usd=(self.cost_nanos - self.cost_estimated_nanos) / _NANOS_PER_USD,
            cost_estimated_usd=self.cost_estimated_nanos / _NANOS_PER_USD,
            unpriced_llm_calls=self.unpriced_llm_calls,
            duplicate_spans=self.duplicate_spans,
        )


@dataclass(slots=True)
class _SpanFacts:
    """What the rules need from one span, read once (each protobuf field read costs)."""

    trace_id: bytes
    parent_span_id: bytes
    start_ns: int
    end_ns: int
    is_error: bool
    fallback_agent: str
    own_agent: str | None = None
    is_llm: bool = False
    tokens_prompt: int = 0
    tokens_completion: int = 0
    tokens_total: int = 0
    tokens_cache_read: int = 0
    tokens_cache_write: int = 0
    tokens_reasoning: int = 0
    model: str = ""
    provider: str | None = None
    # None: the span reports no cost, so the price table is asked.
    cost_reported_usd: float | None = None


class TruthBuilder:
    """Accumulates truth trace by trace, so a long run need not keep its traces in memory."""

    def __init__(self, window_size_ms: int, *, prices: PriceTable | None = None) -> None:
        """``prices`` prices LLM spans that report no cost; by default genai-prices' table
        alone, as the worker's default is."""
        if window_size_ms < 1:
            raise ValueError(f"window_size_ms must be >= 1, got {window_size_ms}")
        self.window_size_ms = window_size_ms
        self._prices = prices if prices is not None else PriceTable()
        self._totals: dict[tuple[str, int], _WindowTotals] = {}
        self._span_count = 0
        self._trace_ids: set[bytes] = set()
        self._max_trace_duration_ns = 0
        self._late_traces: list[LateTrace] = []

    def add(self, trace: GeneratedTrace) -> None:
        self.add_request(trace.request)

    def add_late(self, trace: GeneratedTrace, delay_ms: int) -> None:
        """Note that ``trace`` was published ``delay_ms`` behind its place in event time."""
        self._late_traces.append(
            LateTrace(trace_id=trace.trace_id_hex, end_ms=trace.end_ms, delay_ms=delay_ms)
        )

    def add_copies(self, trace: GeneratedTrace, copies: Mapping[bytes, int]) -> None:
        """Count extra deliveries of ``trace``'s spans (span id -> copies) in
        ``duplicate_spans``, of each span's agent and window."""
        if not copies:
            return
        agents = _agents_of(_facts_of(trace.request))
        for (_, span_id), (facts, agent, _) in agents.items():
            extra = copies.get(span_id, 0)
            if extra:
                self._window(agent, facts).duplicate_spans += extra

    def _window(self, agent: str, facts: _SpanFacts) -> _WindowTotals:
        window = window_start_ms(facts.end_ns, self.window_size_ms)
        totals = self._totals.get((agent, window))
        if totals is None:
            totals = self._totals[(agent, window)] = _WindowTotals()
        return totals

    def add_request(self, request: ExportTraceServiceRequest) -> None:
        """Count every span of ``request`` (a span repeated in it, once). Ancestors are looked
        up within the request, which holds whole traces (one message per trace)."""
        facts_by_id = _facts_of(request)
        trace_bounds: dict[bytes, tuple[int, int]] = {}
        for facts, agent, is_invocation in _agents_of(facts_by_id).values():
            totals = self._window(agent, facts)
            totals.spans += 1
            if facts.is_error:
                totals.errors += 1
            if is_invocation:
                totals.latencies_ms.append((facts.end_ns - facts.start_ns) / _NS_PER_MS)
            if facts.is_llm:
                cost_nanos, estimated = self._cost_of(facts)
                totals.add_llm_call(facts, cost_nanos, estimated)
            first, last = trace_bounds.get(facts.trace_id, (facts.start_ns, 0))
            trace_bounds[facts.trace_id] = (min(first, facts.start_ns), max(last, facts.end_ns))
        self._span_count += len(facts_by_id)
        self._trace_ids.update(trace_bounds)
        for first, last in trace_bounds.values():
            self._max_trace_duration_ns = max(self._max_trace_duration_ns, last - first)

    def _cost_of(self, facts: _SpanFacts) -> tuple[int | None, bool]:
        """An LLM span's cost in nano-USD (None: no price) and whether the table priced it:
        a reported cost wins; else the table's price at the span's end; else none."""
        if facts.cost_reported_usd is not None:
            return round(facts.cost_reported_usd * _NANOS_PER_USD), False
        if not facts.model:
            return None, False
        pricing = self._prices.pricing(facts.model, facts.provider, facts.end_ns // _NS_PER_MS)
        if pricing is None:
            return None, False
        cost = pricing.cost_nanos(
            facts.tokens_prompt,
            facts.tokens_completion,
            facts.tokens_cache_read,
            facts.tokens_cache_write,
        )
        return cost, True

    def build(self, *, generator: dict[str, Any] | None = None) -> Truth:
        """The truth so far; ``generator`` notes how the traffic was made (seed, rate...).

        One pass over the windows in time order: each window's ``ALL_AGENTS`` totals are merged
        from its agents' and dropped once counted, and each agent's open hour and day so far
        are carried along, so that beyond the windows' own latencies it holds, per agent, those
        of one hour and one day."""
        by_window: dict[int, list[tuple[str, _WindowTotals]]] = {}
        for (agent, start_ms), totals in self._totals.items():
            by_window.setdefault(start_ms, []).append((agent, totals))
        rollups: list[Rollup] = []
        hours: list[Rollup] = []
        days_so_far: list[DaySoFar] = []
        calendars: dict[str, _Calendar] = {}
        for start_ms in sorted(by_window):
            everyone = _WindowTotals()
            for _, totals in by_window[start_ms]:
                everyone.merge(totals)
            members = [*by_window[start_ms], (ALL_AGENTS, everyone)]
            for agent, totals in sorted(members, key=lambda member: member[0]):
                rollup = totals.to_rollup(agent, start_ms, self.window_size_ms)
                rollups.append(rollup)
                calendar = calendars.get(agent)
                if calendar is None:
                    calendar = calendars[agent] = _Calendar(agent)
                finished_hour = calendar.add_window(start_ms, totals)
                if finished_hour is not None:
                    hours.append(finished_hour)
                days_so_far.append(calendar.day_so_far(start_ms, self.window_size_ms))
        for calendar in calendars.values():
            last_hour = calendar.finish_hour()
            if last_hour is not None:
                hours.append(last_hour)
        hours.sort(key=lambda rollup: (rollup["window_start_ms"], rollup["agent"]))
        return Truth(
            window_size_ms=self.window_size_ms,
            span_count=self._span_count,
            trace_count=len(self._trace_ids),
            rollups=rollups,
            max_trace_duration_ms=self._max_trace_duration_ns / _NS_PER_MS,
            late_traces=list(self._late_traces),
            generator=dict(generator or {}),
            hours=hours,
            days_so_far=days_so_far,
        )


@dataclass(slots=True)
class _Calendar:
    """One agent's open hour and day so far, fed its windows in time order."""

    agent: str
    hour_start_ms: int | None = None
    hour: _WindowTotals = field(default_factory=_WindowTotals)
    day_start_ms: int | None = None
    day: _WindowTotals = field(default_factory=_WindowTotals)  # its latencies in day_latencies
    day_latencies: _SortedLatencies = field(default_factory=_SortedLatencies)

    def add_window(self, start_ms: int, totals: _WindowTotals) -> Rollup | None:
        """Count the window starting at ``start_ms``; the hour it closes, if it opens one."""
        finished: Rollup | None = None
        hour_start_ms = start_ms // _MS_PER_HOUR * _MS_PER_HOUR
        if hour_start_ms != self.hour_start_ms:
            finished = self.finish_hour()
            self.hour_start_ms = hour_start_ms
        self.hour.merge(totals)
        day_start_ms = start_ms // _MS_PER_DAY * _MS_PER_DAY
        if day_start_ms != self.day_start_ms:
            self.day_start_ms = day_start_ms
            self.day, self.day_latencies = _WindowTotals(), _SortedLatencies()
        self.day.merge(totals, latencies=False)
        self.day_latencies.update(totals.latencies_ms)
        return finished

    def finish_hour(self) -> Rollup | None:
        """The open hour's rollup (None if none is open), and none open after it."""
        if self.hour_start_ms is None:
            return None
        rollup = self.hour.to_rollup(self.agent, self.hour_start_ms, _MS_PER_HOUR)
        self.hour_start_ms, self.hour = None, _WindowTotals()
        return rollup

    def day_so_far(self, start_ms: int, window_size_ms: int) -> DaySoFar:
        """The day's totals up to the window just added, which starts at ``start_ms``."""
        assert self.day_start_ms is not None, "add_window first"
        totals = self.day.to_rollup(self.agent, start_ms, window_size_ms, self.day_latencies)
        return DaySoFar(**totals, day_start_ms=self.day_start_ms)


@dataclass(frozen=True, slots=True)
class Truth:
    """Expected rollups, sorted by (window_start_ms, agent), ``ALL_AGENTS`` among the agents.

    ``hours`` are the hourly totals, sorted likewise; ``days_so_far`` holds, for each entry of
    ``rollups`` and in the same order, the agent's totals over its day up to that window.

    ``max_trace_duration_ms`` is how far before its root's end a trace's first span can end:
    the processor sees a trace only when its message arrives, so unless its allowed lateness
    covers this, early spans of long traces land in ``late_spans`` rather than their window.
    """

    window_size_ms: int
    span_count: int
    trace_count: int
    rollups: list[Rollup]
    max_trace_duration_ms: float = 0.0
    late_traces: list[LateTrace] = field(default_factory=list)
    generator: dict[str, Any] = field(default_factory=dict)
    hours: list[Rollup] = field(default_factory=list)
    days_so_far: list[DaySoFar] = field(default_factory=list)

    @classmethod
    def from_traces(
        cls, traces: Iterable[GeneratedTrace], *, window_size_ms: int = 60_000
    ) -> Truth:
        builder = TruthBuilder(window_size_ms)
        for trace in traces:
            builder.add(trace)
        return builder.build()

    @classmethod
    def from_json(cls, data: bytes) -> Truth:
        document = orjson.loads(data)
        return cls(
            window_size_ms=document["window_size_ms"],
            span_count=document["span_count"],
            trace_count=document["trace_count"],
            rollups=document["rollups"],
            max_trace_duration_ms=document.get("max_trace_duration_ms", 0.0),
            late_traces=document.get("late_traces", []),
            generator=document.get("generator", {}),
            hours=document.get("hours", []),
            days_so_far=document.get("days_so_far", []),
        )

    @classmethod
    def load(cls, path: str | Path) -> Truth:
        return cls.from_json(Path(path).read_bytes())

    def to_json(self) -> bytes:
        document = {
            "window_size_ms": self.window_size_ms,
            "span_count": self.span_count,
            "trace_count": self.trace_count,
            "max_trace_duration_ms": self.max_trace_duration_ms,
            "generator": self.generator,
            "late_traces": self.late_traces,
            "rollups": self.rollups,
            "hours": self.hours,
            "days_so_far": self.days_so_far,
        }
        return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)

    def write(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_json())

    def rollup(self, agent: str, window_start_ms: int) -> Rollup | None:
        """The rollup of ``agent`` for the window starting at ``window_start_ms``, if any."""
        for rollup in self.rollups:
            if rollup["agent"] == agent and rollup["window_start_ms"] == window_start_ms:
                return rollup
        return None

    def hour(self, agent: str, hour_start_ms: int) -> Rollup | None:
        """The totals of ``agent`` for the UTC hour starting at ``hour_start_ms``, if any."""
        for rollup in self.hours:
            if rollup["agent"] == agent and rollup["window_start_ms"] == hour_start_ms:
                return rollup
        return None


_SpanKey = tuple[bytes, bytes]  # (trace id, span id)


def _facts_of(request: ExportTraceServiceRequest) -> dict[_SpanKey, _SpanFacts]:
    facts_by_id: dict[_SpanKey, _SpanFacts] = {}
    for resource_spans in request.resource_spans:
        service_name = UNKNOWN_AGENT
        for attribute in resource_spans.resource.attributes:
            if attribute.key == "service.name" and attribute.value.string_value:
                service_name = attribute.value.string_value
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                facts = _read_facts(span, service_name)
                facts_by_id[(facts.trace_id, span.span_id)] = facts
    return facts_by_id


def _agents_of(
    facts_by_id: dict[_SpanKey, _SpanFacts],
) -> dict[_SpanKey, tuple[_SpanFacts, str, bool]]:
    """Each span's facts, agent and whether it is an invocation."""
    agents: dict[_SpanKey, str] = {}
    attributed: dict[_SpanKey, tuple[_SpanFacts, str, bool]] = {}
    for key, facts in facts_by_id.items():
        agent = _agent_of(key, facts_by_id, agents)
        parent_key = (facts.trace_id, facts.parent_span_id)
        is_invocation = (
            not facts.parent_span_id
            or parent_key not in facts_by_id
            or _agent_of(parent_key, facts_by_id, agents) != agent
        )
        attributed[key] = (facts, agent, is_invocation)
    return attributed


def _read_facts(span: Span, service_name: str) -> _SpanFacts:
    facts = _SpanFacts(
        trace_id=span.trace_id,
        parent_span_id=span.parent_span_id,
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
        is_error=span.status.code == Status.STATUS_CODE_ERROR,
        fallback_agent=service_name,
    )
    found = {attribute.key: attribute.value for attribute in span.attributes}
    own_agent = found.get("agent.name")
    if own_agent is not None and own_agent.string_value:
        facts.own_agent = own_agent.string_value
    kind = found.get("openinference.span.kind")
    operation = found.get("gen_ai.operation.name")
    facts.is_llm = (kind is not None and kind.string_value == "LLM") or (
        operation is not None and operation.string_value in _GENAI_LLM_OPERATIONS
    )
    if facts.is_llm:
        _read_llm_facts(facts, found)
    return facts


def _read_llm_facts(facts: _SpanFacts, found: Mapping[str, AnyValue]) -> None:
    facts.tokens_prompt = _first_count(found, _PROMPT)
    facts.tokens_completion = _first_count(found, _COMPLETION)
    total = found.get("llm.token_count.total")
    facts.tokens_total = (total.int_value if total is not None else 0) or (
        facts.tokens_prompt + facts.tokens_completion
    )
    facts.tokens_cache_read = _first_count(found, _CACHE_READ)
    facts.tokens_cache_write = _first_count(found, _CACHE_WRITE)
    facts.tokens_reasoning = _first_count(found, _REASONING)
    facts.model = _first_string(found, _MODEL)
    facts.provider = _first_string(found, _PROVIDER) or None
    facts.cost_reported_usd = _reported_usd(found.get("llm.cost.total"))


def _reported_usd(value: AnyValue | None) -> float | None:
    """A reported cost: a finite, non-negative number, double or int; anything else is none."""
    if value is None:
        return None
    which = value.WhichOneof("value")
    if which == "double_value":
        usd = value.double_value
    elif which == "int_value":
        usd = float(value.int_value)
    else:
        return None
    return usd if math.isfinite(usd) and usd >= 0 else None


def _first_count(found: Mapping[str, AnyValue], names: tuple[str, ...]) -> int:
    """The count under the first of ``names`` the span has: a present 0 hides the others."""
    for name in names:
        value = found.get(name)
        if value is not None:
            return max(0, value.int_value)
    return 0


def _first_string(found: Mapping[str, AnyValue], names: tuple[str, ...]) -> str:
    for name in names:
        value = found.get(name)
        if value is not None and value.string_value:
            return value.string_value
    return ""


def _agent_of(
    key: tuple[bytes, bytes],
    facts_by_id: dict[tuple[bytes, bytes], _SpanFacts],
    agents: dict[tuple[bytes, bytes], str],
) -> str:
    """The span's own agent, else its nearest ancestor's, else its resource's service name."""
    known = agents.get(key)
    if known is not None:
        return known
    path: list[tuple[bytes, bytes]] = []
    agent: str | None = None
    current: tuple[bytes, bytes] | None = key
    # Walk up until an agent is found; the step bound guards against a parent cycle.
    for _ in range(len(facts_by_id)):
        if current is None:
            break
        cached = agents.get(current)
        if cached is not None:
            agent = cached
            break
        facts = facts_by_id[current]
        path.append(current)
        if facts.own_agent is not None:
            agent = facts.own_agent
            break
        parent = (current[0], facts.parent_span_id)
        current = parent if facts.parent_span_id and parent in facts_by_id else None
    for visited in path:
        # With no agent up the chain, each span falls back to its own resource's service.
        agents[visited] = agent if agent is not None else facts_by_id[visited].fallback_agent
    return agents[key]
