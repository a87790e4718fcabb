"""Trace sampler under loadgen traffic: kept fractions by policy, memory bound, throughput.

Pure core, one process: no Kafka, no network. Run from the project root:

    .venv/bin/python benchmarks/bench_sampling.py [--traces 20000] [--trace-size 20]

Loadgen traces (one OTLP message per trace, the root span last, on a simulated clock of
``--rate`` traces per second) go through decode -> extract -> ``PartitionAggregator`` with a
``TraceSampler``, the clock being the event time. The aggregator is advanced every
``--tick-ms`` of event time, as the worker's timer does, and drained at the end with a
far-future advance. Every span's ``SampledSpan`` is counted and each trace's decision compared
with what the policy says it should be, from the generated traces themselves.

Prints the kept fractions by reason, the sampler's peak buffer against its limits, the
process's peak RSS (and with ``--tracemalloc`` the peak Python allocation of a second, traced
run) and spans per second. Each check prints ``yes`` or ``no``; the exit code is 1 when one
fails.
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import sys
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field

from opentelemetry.proto.common.v1.common_pb2 import KeyValue

from processor.core.attribution import TraceAssembler
from processor.core.decoding import decode_request, extract_spans
from processor.core.partition import PartitionAggregator
from processor.core.sampling import (
    DROP_NOT_SAMPLED,
    DROP_RATE_LIMITED,
    KEEP_REASONS,
    REASON_ATTRIBUTE,
    REASON_ERROR,
    REASON_LATENCY,
    REASON_PROBABILISTIC,
    SampledSpan,
    SamplingPolicy,
    SamplingStats,
    TraceSampler,
)
from processor.core.sampling.policy import matches_attributes
from processor.core.sampling.threshold import trace_id_randomness
from processor.core.semconv import ExtractionConfig
from processor.core.spans import SpanRecord
from processor.loadgen import Scenario, TraceGenerator
from processor.settings import WorkerSettings
from processor.worker.gc_tuning import tune_for_throughput

START_MS = 1_700_000_000_000
NS_PER_MS = 1_000_000
CONTENT_TYPE = "application/x-protobuf"
# Mirrors the worker's aggregate role: traces are remembered for late children at least this long.
MIN_TRACE_TTL_MS = 10_000
UNKNOWN_REASON = "?"  # kept, but every span was rate limited: the reason never showed


@dataclass(slots=True)
class TraceTruth:
    """What the policy needs to know about one generated trace, from its OTLP request."""

    spans: int
    has_error: bool
    duration_ns: int
    matches: bool  # a span carries one of the --attribute-match values
    forced: bool  # handed to force_keep before its message (--exemplar-share)


@dataclass(slots=True)
class Traffic:
    messages: list[tuple[bytes, int, bytes]]  # (payload, root end ms, trace id): one per trace
    truth: dict[bytes, TraceTruth]
    spans: int
    payload_bytes: int


@dataclass(slots=True)
class Outcome:
    """What came out of the sampler for one trace, counted span by span."""

    kept: int = 0
    not_sampled: int = 0
    rate_limited: int = 0
    reasons: set[str] = field(default_factory=set)


@dataclass(slots=True)
class FeedResult:
    spans_in: int
    cpu_s: float
    wall_s: float
    outcomes: dict[bytes, Outcome]
    spans_out: int
    spans_kept: Counter[str]
    spans_not_sampled: int
    spans_rate_limited: int
    stats: SamplingStats | None
    peak_buffered_traces: int
    peak_buffered_spans: int
    rejected_spans: int


def _parse_match(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_traffic(args: argparse.Namespace) -> Traffic:
    scenario = Scenario(
        agents=args.agents, trace_size=args.trace_size, error_rate=args.error_rate, seed=args.seed
    )
    generator = TraceGenerator(scenario, start_ms=START_MS, rate=args.rate)
    # Its own stream, so the chosen traces do not depend on how loadgen draws its numbers.
    choose = random.Random(f"bench-sampling/{args.seed}")
    key, value = args.attribute_match
    matches = {key: frozenset({value})}
    messages: list[tuple[bytes, int, bytes]] = []
    truth: dict[bytes, TraceTruth] = {}
    spans_total = 0
    payload_bytes = 0
    for trace in generator.generate(args.traces):
        spans = trace.request.resource_spans[0].scope_spans[0].spans
        payload = trace.payload
        # Loadgen has no attribute shared by a small set of traces (session.id is unique per
        # trace), so the benchmark flags a share of the roots itself, as an app marking a
        # session for review would.
        if choose.random() < args.flagged_share:
            root = next(span for span in spans if not span.parent_span_id)
            root.attributes.append(_attribute(key, value))
            payload = trace.request.SerializeToString()
        forced = choose.random() < args.exemplar_share
        truth[trace.trace_id] = TraceTruth(
            spans=len(spans),
            has_error=trace.has_error,
            duration_ns=max(s.end_time_unix_nano for s in spans)
            - min(s.start_time_unix_nano for s in spans),
            matches=any(matches_attributes(span.attributes, matches) for span in spans),
            forced=forced,
        )
        messages.append((payload, trace.end_ms, trace.trace_id))
        spans_total += len(spans)
        payload_bytes += len(payload)
    return Traffic(messages, truth, spans_total, payload_bytes)


def _attribute(key: str, value: str) -> KeyValue:
    attribute = KeyValue(key=key)
    # "true"/"false" as a bool: the policy's documented bool matching gets exercised too.
    if value in ("true", "false"):
        attribute.value.bool_value = value == "true"
    else:
        attribute.value.string_value = value
    return attribute


def latency_p95_ms(truth: dict[bytes, TraceTruth]) -> int:
    durations = sorted(item.duration_ns for item in truth.values())
    rank = max(0, math.ceil(0.95 * len(durations)) - 1)  # nearest rank
    return durations[rank] // NS_PER_MS


def build_policy(args: argparse.Namespace, latency_threshold_ms: int) -> SamplingPolicy:
    key, value = args.attribute_match
    return SamplingPolicy(
        probability=args.probability,
        latency_threshold_ms=latency_threshold_ms,
        attribute_matches={key: frozenset({value})},
        agent_spans_per_second=args.agent_spans_per_second,
        decision_grace_ms=args.decision_grace_ms,
        decision_max_wait_ms=args.decision_max_wait_ms,
        max_buffered_spans=args.max_buffered_spans,
        max_buffered_traces=args.max_buffered_traces,
        decision_cache_size=args.decision_cache_size,
        budget_spans_per_second=args.budget,
    )


_Outcome = tuple[bytes, bool, str | None, str | None]  # trace id, keep, reason, drop reason


class RecordingSampler(TraceSampler):
    """The worker's sampler, noting every span's outcome: the aggregator lists only kept
    spans (dropped ones are counted), and this benchmark checks every span's outcome."""

    def __init__(self, policy: SamplingPolicy) -> None:
        super().__init__(policy)
        self.outcomes: list[_Outcome] = []

    def drop_now(self, span: SpanRecord) -> bool:
        dropped = super().drop_now(span)
        if dropped:
            self.outcomes.append((span.trace_id, False, None, DROP_NOT_SAMPLED))
        return dropped

    def add(
        self,
        span: SpanRecord,
        agent: str,
        offset: int,
        *,
        is_invocation: bool = False,
        first_offset: int | None = None,
    ) -> list[SampledSpan]:
        return self._noted(
            super().add(span, agent, offset, is_invocation=is_invocation, first_offset=first_offset)
        )

    def advance(self, watermark_ms: int) -> list[SampledSpan]:
        return self._noted(super().advance(watermark_ms))

    def _noted(self, decided: list[SampledSpan]) -> list[SampledSpan]:
        self.outcomes += [(d.trace_id, d.keep, d.reason, d.drop_reason) for d in decided]
        return decided

    def take_outcomes(self) -> list[_Outcome]:
        outcomes, self.outcomes = self.outcomes, []
        return outcomes


def new_aggregator(
    policy: SamplingPolicy | None, settings: WorkerSettings, max_traces: int
) -> PartitionAggregator:
    """A partition's aggregator built as the worker's aggregate role builds it."""
    ttl_ms = max(settings.allowed_lateness_ms, MIN_TRACE_TTL_MS)
    return PartitionAggregator(
        0,
        window_size_ms=settings.window_size_ms,
        allowed_lateness_ms=settings.allowed_lateness_ms,
        idle_timeout_ms=settings.idle_timeout_ms,
        max_series_per_window=settings.max_series_per_window,
        assembler=TraceAssembler(
            max_traces=max_traces,
            attribution_wait_ms=settings.allowed_lateness_ms,
            trace_ttl_ms=ttl_ms,
        ),
        trace_ttl_ms=ttl_ms,
        sampler=RecordingSampler(policy) if policy is not None else None,
    )


def feed(
    traffic: Traffic,
    policy: SamplingPolicy | None,
    settings: WorkerSettings,
    *,
    tick_ms: int,
    max_traces: int,
) -> FeedResult:
    """Every message through decode -> aggregator in event-time order, then a final drain.

    Only the calls a worker makes are timed; the counting done here for the report is not.
    """
    config = ExtractionConfig()
    aggregator = new_aggregator(policy, settings, max_traces)
    sampler = aggregator.sampler
    assert sampler is None or isinstance(sampler, RecordingSampler)

    def outcomes_now() -> list[_Outcome]:
        if sampler is None:  # every span is kept, and listed
            return [(d.trace_id, d.keep, d.reason, d.drop_reason) for d in aggregator.take_kept()]
        aggregator.take_kept()  # as the worker takes them
        return sampler.take_outcomes()

    outcomes: dict[bytes, Outcome] = {}
    spans_kept: Counter[str] = Counter()
    not_sampled = rate_limited = spans_out = rejected = 0
    peak_traces = peak_spans = 0
    cpu = 0.0
    process_time = time.process_time

    def count(decided: list[_Outcome]) -> None:
        nonlocal not_sampled, rate_limited, spans_out
        for trace_id, keep, reason, drop_reason in decided:
            spans_out += 1
            outcome = outcomes.get(trace_id)
            if outcome is None:
                outcome = outcomes[trace_id] = Outcome()
            if keep:
                outcome.kept += 1
                label = reason or "(no sampler)"
                outcome.reasons.add(label)
                spans_kept[label] += 1
            elif drop_reason == DROP_RATE_LIMITED:
                outcome.rate_limited += 1
                rate_limited += 1
            else:
                outcome.not_sampled += 1
                not_sampled += 1

    wall_began = time.perf_counter()
    next_tick = traffic.messages[0][1] + tick_ms if traffic.messages else 0
    for offset, (payload, end_ms, _trace_id) in enumerate(traffic.messages):
        began = process_time()
        while end_ms >= next_tick:
            # The worker's timer fires between messages; its checkpoint scans the buffers too.
            aggregator.advance(next_tick, caught_up=False)
            aggregator.checkpoint(offset)
            next_tick += tick_ms
        request = decode_request(payload, CONTENT_TYPE)
        decoded = extract_spans(request, config, payload=payload, content_type=CONTENT_TYPE)
        aggregator.add(offset, decoded.spans, end_ms)
        decoded.source.release()  # as the worker does once a message is handled
        decided = outcomes_now()
        cpu += process_time() - began
        rejected += len(decoded.rejected)
        count(decided)
        if sampler is not None:
            stats = sampler.stats
            if stats.buffered_traces > peak_traces:
                peak_traces = stats.buffered_traces
            if stats.buffered_spans > peak_spans:
                peak_spans = stats.buffered_spans
    began = process_time()
    # Far past every span: the watermark follows the clock (caught up and idle) and every
    # buffered trace falls due.
    last_ms = traffic.messages[-1][1] if traffic.messages else START_MS
    aggregator.advance(last_ms + 3_600_000, caught_up=True)
    decided = outcomes_now()
    cpu += process_time() - began
    count(decided)
    wall = time.perf_counter() - wall_began
    return FeedResult(
        spans_in=traffic.spans,
        cpu_s=cpu,
        wall_s=wall,
        outcomes=outcomes,
        spans_out=spans_out,
        spans_kept=spans_kept,
        spans_not_sampled=not_sampled,
        spans_rate_limited=rate_limited,
        stats=sampler.stats if sampler is not None else None,
        peak_buffered_traces=peak_traces,
        peak_buffered_spans=peak_spans,
        rejected_spans=rejected,
    )


def expected_reason(item: TraceTruth, policy: SamplingPolicy, trace_id: bytes) -> str | None:
    """The reason the policy gives this trace, from the generated trace itself."""
    latency = policy.latency_threshold_ms
    if policy.keep_errors and item.has_error:
        return REASON_ERROR
    if latency is not None and item.duration_ns >= latency * NS_PER_MS:
        return REASON_LATENCY
    if item.matches:
        return REASON_ATTRIBUTE
    if trace_id_randomness(trace_id) >= policy.threshold:
        return REASON_PROBABILISTIC
    return None


def actual_reason(outcome: Outcome) -> str | None:
    """The trace's decision as its spans show it: None when dropped."""
    if outcome.not_sampled:
        return None
    if len(outcome.reasons) == 1:
        return next(iter(outcome.reasons))
    return UNKNOWN_REASON if not outcome.reasons else ",".join(sorted(outcome.reasons))


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:8.2f}%" if whole else "        -"


def _mib(kib: int) -> float:
    return kib / 1024  # ru_maxrss is in KiB on Linux


def _peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    defaults = WorkerSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=20_000)
    parser.add_argument("--trace-size", type=int, default=20, help="mean spans per trace")
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--error-rate", type=float, default=0.05, help="loadgen, per call")
    parser.add_argument("--rate", type=float, default=50.0, help="traces per second of event time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probability", type=float, default=defaults.sampling_probability)
    parser.add_argument(
        "--latency-threshold-ms",
        type=int,
        default=None,
        help="default: the 95th percentile of the generated traces' durations",
    )
    parser.add_argument(
        "--attribute-match",
        type=_parse_match,
        default=("session.flagged", "true"),
        metavar="KEY=VALUE",
    )
    parser.add_argument(
        "--flagged-share",
        type=float,
        default=0.01,
        help="share of traces whose root span gets the --attribute-match attribute",
    )
    parser.add_argument(
        "--exemplar-share",
        type=float,
        default=0.0,
        help="share of traces handed to force_keep before their spans (nothing in the "
        "pipeline calls it today)",
    )
    parser.add_argument(
        "--agent-spans-per-second", type=float, default=defaults.sampling_agent_spans_per_second
    )
    parser.add_argument("--budget", type=float, default=None)
    parser.add_argument("--max-buffered-traces", type=int, default=defaults.max_traces)
    parser.add_argument(
        "--max-buffered-spans", type=int, default=defaults.sampling_max_buffered_spans
    )
    parser.add_argument(
        "--decision-cache-size", type=int, default=SamplingPolicy().decision_cache_size
    )
    parser.add_argument(
        "--decision-grace-ms", type=int, default=defaults.sampling_decision_grace_ms
    )
    parser.add_argument(
        "--decision-max-wait-ms", type=int, default=defaults.sampling_decision_max_wait_ms
    )
    parser.add_argument("--tick-ms", type=int, default=500, help="the worker's timer, event time")
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the same traffic without a sampler",
    )
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="feed once more under tracemalloc for the run's peak allocation (slow)",
    )
    parser.add_argument(
        "--gc",
        choices=("worker", "default"),
        default="worker",
        help="the worker's garbage-collector settings (processor.worker.gc_tuning) or CPython's",
    )
    args = parser.parse_args()

    began = time.perf_counter()
    traffic = build_traffic(args)
    generated_s = time.perf_counter() - began
    rss_before_kib = _peak_rss_kib()
    latency_ms = args.latency_threshold_ms
    if latency_ms is None:
        latency_ms = latency_p95_ms(traffic.truth)
    policy = build_policy(args, latency_ms)
    if args.gc == "worker":
        tune_for_throughput()  # after the traffic is built, as the worker after start-up
    traces = len(traffic.truth)
    print(
        f"{traces:,} traces, {traffic.spans:,} spans ({traffic.spans / max(traces, 1):.1f} per "
        f"trace), {traffic.payload_bytes / 2**20:.0f} MiB of OTLP, {args.rate:g} traces/s of "
        f"event time; generated in {generated_s:.1f}s"
    )
    print(f"policy: {policy.summary()}")
    print(
        f"        grace {policy.decision_grace_ms} ms, max wait {policy.decision_max_wait_ms} ms, "
        f"allowed lateness {defaults.allowed_lateness_ms} ms, tick {args.tick_ms} ms"
    )

    result = feed(
        traffic, policy, defaults, tick_ms=args.tick_ms, max_traces=args.max_buffered_traces
    )
    rss_after_kib = _peak_rss_kib()
    stats = result.stats
    assert stats is not None

    truth = traffic.truth
    expected = {
        trace_id: expected_reason(item, policy, trace_id) for trace_id, item in truth.items()
    }
    actual = {
        trace_id: actual_reason(result.outcomes.get(trace_id, Outcome())) for trace_id in truth
    }
    traces_by_reason = Counter(reason for reason in actual.values() if reason is not None)
    traces_kept = sum(traces_by_reason.values())
    spans_total = result.spans_in

    print()
    print("kept by policy (share of all traces / spans)")
    print(f"  {'reason':<26}{'traces':>10}{'share':>9}{'spans':>12}{'share':>9}")
    for reason in (*KEEP_REASONS, UNKNOWN_REASON):
        n_traces = traces_by_reason.get(reason, 0)
        n_spans = result.spans_kept.get(reason, 0)
        if reason == UNKNOWN_REASON and not n_traces:
            continue
        label = "kept, all spans limited" if reason == UNKNOWN_REASON else reason
        print(
            f"  {label:<26}{n_traces:>10,}{_share(n_traces, traces)}"
            f"{n_spans:>12,}{_share(n_spans, spans_total)}"
        )
    kept_spans = sum(result.spans_kept.values())
    print(
        f"  {'all kept':<26}{traces_kept:>10,}{_share(traces_kept, traces)}"
        f"{kept_spans:>12,}{_share(kept_spans, spans_total)}"
    )
    dropped_traces = traces - traces_kept
    print(
        f"  {'dropped: not sampled':<26}{dropped_traces:>10,}{_share(dropped_traces, traces)}"
        f"{result.spans_not_sampled:>12,}{_share(result.spans_not_sampled, spans_total)}"
    )
    limited_traces = sum(1 for o in result.outcomes.values() if o.rate_limited)
    print(
        f"  {'dropped: rate limited':<26}{limited_traces:>10,}{_share(limited_traces, traces)}"
        f"{result.spans_rate_limited:>12,}{_share(result.spans_rate_limited, spans_total)}"
        "   (traces: with a span over the limit)"
    )
    if policy.agent_spans_per_second is not None:
        error_outcomes = [
            result.outcomes[trace_id] for trace_id, item in truth.items() if item.has_error
        ]
        limited_errors = sum(1 for o in error_outcomes if o.rate_limited)
        silent_errors = sum(1 for o in error_outcomes if o.rate_limited and not o.kept)
        print(
            f"  error traces with spans over the rate limit: {limited_errors:,} of "
            f"{len(error_outcomes):,}, {silent_errors:,} of them with no span forwarded"
        )
    ordinary = [
        trace_id
        for trace_id, item in truth.items()
        if expected[trace_id] in (REASON_PROBABILISTIC, None)
    ]
    # A kept trace whose every span hit the rate limit shows no reason, but for these traces
    # a keep can only be probabilistic.
    ordinary_kept = sum(1 for trace_id in ordinary if actual[trace_id] is not None)
    errors = sum(item.has_error for item in truth.values())
    slow = sum(item.duration_ns >= latency_ms * NS_PER_MS for item in truth.values())
    flagged = sum(item.matches for item in truth.values())
    print(
        f"  in the traffic: {errors:,} error traces ({_share(errors, traces).strip()}), "
        f"{slow:,} slow ({_share(slow, traces).strip()}), "
        f"{flagged:,} with the attribute ({_share(flagged, traces).strip()})"
    )
    print(
        f"  non-error, non-slow, unflagged traces kept probabilistically: {ordinary_kept:,} of "
        f"{len(ordinary):,} = {_share(ordinary_kept, len(ordinary)).strip()} "
        f"(p = {policy.probability:g})"
    )

    print()
    print("memory bound")
    cache_entries = stats.traces_decided - stats.cache_evictions
    print(
        f"  peak buffered traces     {result.peak_buffered_traces:>10,}"
        f"  of max {policy.max_buffered_traces:,}"
        f" ({_share(result.peak_buffered_traces, policy.max_buffered_traces).strip()})"
    )
    print(
        f"  peak buffered spans      {result.peak_buffered_spans:>10,}"
        f"  of max {policy.max_buffered_spans:,}"
        f" ({_share(result.peak_buffered_spans, policy.max_buffered_spans).strip()})"
        "   (sampled after each message)"
    )
    print(
        f"  decision cache           {cache_entries:>10,}  of max {policy.decision_cache_size:,}, "
        f"{stats.cache_evictions:,} evictions"
    )
    print(
        f"  decided early            {stats.decided_early:>10,}  (pushed out by the bounds), "
        f"{stats.spans_after_decision:,} spans after their decision"
    )
    print(
        f"  peak RSS                 {_mib(rss_after_kib):>10.0f} MiB"
        f"  ({_mib(rss_before_kib):.0f} MiB before feeding: interpreter, generator and the "
        f"{traffic.payload_bytes / 2**20:.0f} MiB of messages held)"
    )
    if args.tracemalloc:
        tracemalloc.start()
        traced = feed(
            traffic, policy, defaults, tick_ms=args.tick_ms, max_traces=args.max_buffered_traces
        )
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        per_span = traced_peak / max(traced.peak_buffered_spans, 1)
        print(
            f"  tracemalloc peak         {traced_peak / 2**20:>10.1f} MiB"
            f"  (second run; {per_span / 1024:.1f} KiB per peak buffered span, "
            "aggregator state included)"
        )

    print()
    print("throughput, decode -> PartitionAggregator (CPU time of this process)")
    rate = result.spans_in / result.cpu_s if result.cpu_s else float("nan")
    print(
        f"  with sampler             {rate:>10,.0f} spans/s  "
        f"({result.cpu_s:.1f}s CPU, {result.wall_s:.1f}s wall with the counting)"
    )
    if args.baseline:
        base = feed(
            traffic, None, defaults, tick_ms=args.tick_ms, max_traces=args.max_buffered_traces
        )
        base_rate = base.spans_in / base.cpu_s if base.cpu_s else float("nan")
        print(
            f"  without sampler          {base_rate:>10,.0f} spans/s  "
            f"(sampler's share of the CPU: {1 - base.cpu_s / result.cpu_s:.0%})"
        )

    mismatched: Counter[tuple[str | None, str | None]] = Counter(
        (expected[trace_id], actual[trace_id])
        for trace_id in truth
        if expected[trace_id] != actual[trace_id]
        # a trace whose every span was rate limited shows no reason: only its keep is known
        and not (actual[trace_id] == UNKNOWN_REASON and expected[trace_id] is not None)
    )
    sigma = math.sqrt(policy.probability * (1 - policy.probability) / max(len(ordinary), 1))
    share = ordinary_kept / len(ordinary) if ordinary else policy.probability
    counted_kept = {reason: result.spans_kept.get(reason, 0) for reason in KEEP_REASONS}
    checks = {
        "every error trace kept": all(
            actual[trace_id] is not None for trace_id, item in truth.items() if item.has_error
        ),
        "every slow trace kept": all(
            actual[trace_id] is not None
            for trace_id, item in truth.items()
            if item.duration_ns >= latency_ms * NS_PER_MS
        ),
        "every flagged trace kept": all(
            actual[trace_id] is not None for trace_id, item in truth.items() if item.matches
        ),
        "every forced trace kept": all(
            actual[trace_id] is not None for trace_id, item in truth.items() if item.forced
        ),
        "every trace decided as the policy says, first reason first": not mismatched,
        "probabilistic share within 4 standard errors of p": abs(share - policy.probability)
        <= 4 * sigma,
        "every span came out exactly once": result.spans_out == result.spans_in
        and sum(o.kept + o.not_sampled + o.rate_limited for o in result.outcomes.values())
        == result.spans_in,
        "no span rejected by the decoder": result.rejected_spans == 0,
        "span counts agree with SamplingStats": counted_kept == stats.spans_kept
        and result.spans_not_sampled + result.spans_rate_limited == stats.spans_dropped
        and result.spans_rate_limited == stats.spans_rate_limited,
        "buffered traces within max_buffered_traces": result.peak_buffered_traces
        <= policy.max_buffered_traces,
        "buffered spans within max_buffered_spans": result.peak_buffered_spans
        <= policy.max_buffered_spans,
        "nothing left buffered after the drain": stats.buffered_traces == 0
        and stats.buffered_spans == 0,
    }
    print()
    print("checks")
    for name, passed in checks.items():
        print(f"  {name}: {'yes' if passed else 'no'}")
    for (want, got), n in mismatched.most_common(10):
        print(f"    expected {want or 'drop'}, got {got or 'drop'}: {n:,} traces")
    if not all(checks.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
