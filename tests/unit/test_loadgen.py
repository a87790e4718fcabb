"""The load generator: realistic, deterministic traces, and a truth file that can be trusted.

The truth is checked against a second, deliberately naive recount straight from the published
bytes, so a bug in either shows up as a disagreement.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter, defaultdict
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any

import pytest
from genai_prices import Usage, calc_price
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from processor.core.pricing import PriceTable
from processor.core.rollup import ALL_AGENTS
from processor.loadgen import (
    GeneratedTrace,
    LateReorderer,
    Scenario,
    TraceGenerator,
    Truth,
    TruthBuilder,
    UpstreamSampler,
    llm_cost_usd,
    lower_quantile,
    window_start_ms,
)
from processor.loadgen.pacing import realtime_traces
from processor.loadgen.scenario import MODEL_PRICES, UNPRICED_MODEL, ModelPrice

WINDOW_MS = 60_000
# A window boundary, so that trace 0 of a generator started here ends exactly on it.
ALIGNED_START_MS = 1_700_000_040_000
assert ALIGNED_START_MS % WINDOW_MS == 0


def generate(count: int, **scenario: Any) -> list[GeneratedTrace]:
    generator = TraceGenerator(Scenario(**scenario), start_ms=ALIGNED_START_MS, rate=20.0)
    return list(generator.generate(count))


def decoded_spans(trace: GeneratedTrace) -> list[Span]:
    """The spans as a consumer sees them: parsed from the published bytes."""
    request = ExportTraceServiceRequest.FromString(trace.payload)
    return [span for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans]


def attributes(span: Span) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for attribute in span.attributes:
        which = attribute.value.WhichOneof("value")
        assert which is not None
        values[attribute.key] = getattr(attribute.value, which)
    return values


def kind_of(values: dict[str, Any]) -> str:
    """OpenInference's span kind; a GenAI-convention span says LLM by its chat operation."""
    if values.get("gen_ai.operation.name") == "chat":
        return "LLM"
    return str(values["openinference.span.kind"])


def usage(values: dict[str, Any], openinference: str, genai: str) -> int:
    """A usage count under either convention's name (a span uses one of them)."""
    return int(values.get(openinference, values.get(genai, 0)))


def prompt_of(values: dict[str, Any]) -> int:
    return usage(values, "llm.token_count.prompt", "gen_ai.usage.input_tokens")


def completion_of(values: dict[str, Any]) -> int:
    return usage(values, "llm.token_count.completion", "gen_ai.usage.output_tokens")


def cache_read_of(values: dict[str, Any]) -> int:
    return usage(
        values, "llm.token_count.prompt_details.cache_read", "gen_ai.usage.cache_read.input_tokens"
    )


def cache_write_of(values: dict[str, Any]) -> int:
    return usage(
        values,
        "llm.token_count.prompt_details.cache_write",
        "gen_ai.usage.cache_creation.input_tokens",
    )


def reasoning_of(values: dict[str, Any]) -> int:
    return usage(
        values,
        "llm.token_count.completion_details.reasoning",
        "gen_ai.usage.reasoning.output_tokens",
    )


def model_of(values: dict[str, Any]) -> str:
    return str(values.get("llm.model_name") or values["gen_ai.request.model"])


def provider_of(values: dict[str, Any]) -> str:
    return str(values.get("llm.provider") or values["gen_ai.provider.name"])


def llm_calls(traces: list[GeneratedTrace]) -> list[tuple[Span, dict[str, Any]]]:
    """Every LLM span of ``traces`` with its attributes, failed calls included."""
    return [
        (span, values)
        for trace in traces
        for span in decoded_spans(trace)
        if kind_of(values := attributes(span)) == "LLM"
    ]


def answered(calls: list[tuple[Span, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The calls that returned usage (a failed call reports none)."""
    return [values for span, values in calls if span.status.code != Status.STATUS_CODE_ERROR]


# Shape and determinism ---------------------------------------------------------------------


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not() -> None:
    first = [t.payload for t in generate(30, seed=11)]
    again = [t.payload for t in generate(30, seed=11)]
    other = [t.payload for t in generate(30, seed=12)]
    assert first == again
    assert not set(first) & set(other)


def test_trace_i_does_not_depend_on_the_traces_before_it() -> None:
    generator = TraceGenerator(Scenario(seed=3), start_ms=ALIGNED_START_MS, rate=10.0)
    whole = [t.payload for t in generator.generate(8)]
    tail = [t.payload for t in generator.generate(3, first_index=5)]
    assert tail == whole[5:]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    trace_size=st.integers(min_value=4, max_value=150),
    agents=st.integers(min_value=1, max_value=15),
)
def test_trace_structure_is_a_valid_otlp_trace(seed: int, trace_size: int, agents: int) -> None:
    for trace in generate(4, seed=seed, trace_size=trace_size, agents=agents):
        spans = decoded_spans(trace)
        by_id = {span.span_id: span for span in spans}
        assert len(by_id) == len(spans) == trace.span_count
        assert [span.span_id for span in spans] == trace.span_ids
        assert len(trace.trace_id) == 16 and any(trace.trace_id)
        assert trace.trace_id_hex == trace.trace_id.hex()
        roots = [span for span in spans if not span.parent_span_id]
        assert len(roots) == 1
        root = roots[0]
        assert attributes(root)["agent.name"] == "orchestrator"
        assert attributes(root)["openinference.span.kind"] == "AGENT"
        # Exported as an SDK does, by end time: the root last.
        assert spans[-1].span_id == root.span_id
        assert trace.end_ms == root.end_time_unix_nano // 1_000_000
        for span in spans:
            assert span.trace_id == trace.trace_id
            assert len(span.span_id) == 8 and any(span.span_id)
            assert span.start_time_unix_nano < span.end_time_unix_nano
            if span.parent_span_id:
                parent = by_id[span.parent_span_id]  # every parent is in the trace
                assert parent.start_time_unix_nano <= span.start_time_unix_nano
                assert span.end_time_unix_nano <= parent.end_time_unix_nano


def test_agent_name_is_set_on_agent_spans_and_only_there() -> None:
    kinds_seen = set()
    for trace in generate(60, trace_size=40):
        for span in decoded_spans(trace):
            values = attributes(span)
            kind = kind_of(values)
            kinds_seen.add(kind)
            assert ("agent.name" in values) == (kind == "AGENT")
    assert kinds_seen == {"AGENT", "CHAIN", "LLM", "TOOL", "RETRIEVER"}


def test_llm_spans_carry_consistent_tokens_and_cost_from_the_price_table() -> None:
    counted = 0
    for span, values in llm_calls(generate(40)):
        assert span.kind == Span.SPAN_KIND_CLIENT
        if prompt_of(values) == 0:
            assert span.status.code == Status.STATUS_CODE_ERROR  # failed calls report none
            assert "llm.cost.total" not in values
            continue
        counted += 1
        prompt, completion = prompt_of(values), completion_of(values)
        if "openinference.span.kind" in values:
            assert values["llm.token_count.total"] == prompt + completion
        else:
            assert "llm.token_count.total" not in values  # the GenAI conventions have none
        # The details are parts of the prompt and of the completion.
        assert cache_read_of(values) + cache_write_of(values) <= prompt
        assert reasoning_of(values) <= completion
        if "llm.cost.total" in values:
            assert values["llm.cost.total"] == llm_cost_usd(
                model_of(values), prompt, completion, cache_read_of(values)
            )
    assert counted > 100


def test_the_traffic_calls_real_models_of_two_providers_in_both_conventions() -> None:
    calls = llm_calls(generate(200))
    providers = Counter(provider_of(values) for _, values in calls)
    assert {"openai", "anthropic"} <= set(providers)
    assert min(providers["openai"], providers["anthropic"]) > 0.15 * len(calls)
    genai = [values for _, values in calls if "gen_ai.operation.name" in values]
    openinference = [values for _, values in calls if "openinference.span.kind" in values]
    assert len(genai) + len(openinference) == len(calls)
    assert 0.12 < len(genai) / len(calls) < 0.28
    for values in genai:
        # Only GenAI names, so the worker must read that convention to count these calls.
        assert not [key for key in values if key.startswith("llm.")], values
        assert values["gen_ai.operation.name"] == "chat"
        assert values["gen_ai.provider.name"] in ("openai", "anthropic", UNPRICED_MODEL.provider)
    for values in openinference:
        assert not [key for key in values if key.startswith("gen_ai.")], values
        assert values["openinference.span.kind"] == "LLM"
        assert "llm.provider" in values
    assert {model_of(values) for values in genai} == {model_of(v) for v in openinference}


@pytest.mark.parametrize("price", list(MODEL_PRICES.values()), ids=lambda price: price.model)
def test_every_model_the_agents_use_is_in_the_price_catalogue(price: ModelPrice) -> None:
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    for at_ms in (ALIGNED_START_MS, now_ms):
        assert PriceTable().pricing(price.model, price.provider, at_ms) is not None


def test_the_in_house_model_is_unknown_to_the_price_catalogue() -> None:
    assert (
        PriceTable().pricing(UNPRICED_MODEL.model, UNPRICED_MODEL.provider, ALIGNED_START_MS)
        is None
    )


def test_some_calls_read_or_write_the_prompt_cache_and_reasoning_models_reason() -> None:
    scenario: dict[str, Any] = {"agents": 12, "seed": 0}
    # Agents pick their models at random: these ones cover every model.
    assert {p.model for p in Scenario(**scenario).profiles()} == set(MODEL_PRICES)
    calls = answered(llm_calls(generate(300, **scenario)))
    reads = [values for values in calls if cache_read_of(values)]
    assert 0.3 < len(reads) / len(calls) < 0.5
    writes = [values for values in calls if cache_write_of(values)]
    assert writes and {provider_of(values) for values in writes} == {"anthropic"}
    assert not [values for values in writes if cache_read_of(values)]  # a miss writes, a hit reads
    reasoning = Counter(model_of(values) for values in calls if reasoning_of(values))
    assert set(reasoning) == {"o3-mini", "claude-sonnet-4-20250514"}
    o3_calls = sum(model_of(values) == "o3-mini" for values in calls)
    assert reasoning["o3-mini"] > 0.95 * o3_calls  # it always reasons (tiny answers round to 0)
    sonnet_calls = sum(model_of(values) == "claude-sonnet-4-20250514" for values in calls)
    assert 0.3 * sonnet_calls < reasoning["claude-sonnet-4-20250514"] < 0.7 * sonnet_calls


def test_a_share_of_llm_calls_reports_no_cost_and_a_few_name_an_unknown_model() -> None:
    calls = answered(llm_calls(generate(300)))
    unreported = [values for values in calls if "llm.cost.total" not in values]
    assert 0.24 < len(unreported) / len(calls) < 0.38
    in_house = [values for values in calls if model_of(values) == UNPRICED_MODEL.model]
    assert 0.01 < len(in_house) / len(calls) < 0.06
    # The GenAI conventions have no cost attribute, and no one knows the in-house model's price.
    assert all("llm.cost.total" not in values for values in in_house)
    assert all(
        "llm.cost.total" not in values for values in calls if "gen_ai.operation.name" in values
    )
    # Some OpenInference calls of priced models report none either: the table prices them.
    assert [
        values
        for values in unreported
        if "openinference.span.kind" in values and model_of(values) != UNPRICED_MODEL.model
    ]


def test_the_mean_trace_size_is_what_was_asked() -> None:
    for asked in (20, 100):
        traces = generate(400, trace_size=asked)
        mean = sum(t.span_count for t in traces) / len(traces)
        assert abs(mean - asked) < 0.08 * asked


# Where realistic payloads put text: the values an instrumentation records, 0.3-4 KB each.
_PAYLOAD_PREFIXES = ("input.", "output.", "llm.input_messages.", "llm.output_messages.")
_GENAI_MESSAGES = ("gen_ai.input.messages", "gen_ai.output.messages")


def test_realistic_payloads_add_kilobytes_of_text_to_llm_and_agent_spans_and_nothing_else() -> None:
    small = generate(60, trace_size=100, seed=8)
    realistic = generate(60, trace_size=100, seed=8, payloads="realistic")
    sizes: list[int] = []
    for plain, heavy in zip(small, realistic, strict=True):
        assert heavy.trace_id == plain.trace_id and heavy.span_ids == plain.span_ids
        for plain_span, span in zip(decoded_spans(plain), decoded_spans(heavy), strict=True):
            before, values = attributes(plain_span), attributes(span)
            # Kinds, models, usage, cost and the root's question stay as they were.
            assert {key: values[key] for key in before} == before
            added = values.keys() - before.keys()
            assert all(key.startswith(_PAYLOAD_PREFIXES) or key in _GENAI_MESSAGES for key in added)
            assert span.status == plain_span.status
            ok = span.status.code != Status.STATUS_CODE_ERROR
            kind = kind_of(values)
            if kind == "LLM":
                outputs = {"output.value", "gen_ai.output.messages"} & added
                assert added and bool(outputs) is ok, "a prompt, and a completion if it returned"
            elif kind == "AGENT":
                assert ("output.value" in added) is ok
            else:
                assert not added
            sizes += [len(values[key].encode()) for key in {"input.value", "output.value"} & added]
    assert min(sizes) >= 300 and max(sizes) <= 4096
    assert 900 < sorted(sizes)[len(sizes) // 2] < 1500  # log-uniform: median ~1.1 KB
    published = sum(len(trace.payload) for trace in realistic)
    assert published > 8 * sum(len(trace.payload) for trace in small)
    assert Truth.from_traces(realistic).to_json() == Truth.from_traces(small).to_json()


@pytest.mark.parametrize(
    ("error_rate", "expect_errors"),
    [(0.0, False), (0.05, True), (1.0, True)],
)
def test_error_rate_controls_failures(error_rate: float, expect_errors: bool) -> None:
    traces = generate(50, error_rate=error_rate)
    failed = [
        span
        for trace in traces
        for span in decoded_spans(trace)
        if span.status.code == Status.STATUS_CODE_ERROR
    ]
    assert bool(failed) == expect_errors
    assert sum(t.error_count for t in traces) == len(failed)
    assert all(span.status.message for span in failed)
    if error_rate == 1.0:
        # Every tool call fails when the rate is 1.
        for trace in traces:
            for span in decoded_spans(trace):
                if attributes(span).get("openinference.span.kind") == "TOOL":
                    assert span.status.code == Status.STATUS_CODE_ERROR


@pytest.mark.parametrize(
    "bad",
    [
        {"agents": 0},
        {"trace_size": 3},
        {"error_rate": -0.1},
        {"error_rate": 1.5},
        {"seed": -1},
        {"service_name": ""},
        {"latency_scale": 0.0},
        {"payloads": "huge"},
    ],
)
def test_scenario_rejects_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Scenario(**bad)


def test_generator_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TraceGenerator(Scenario(), start_ms=ALIGNED_START_MS, rate=0.0)
    with pytest.raises(ValueError):
        TraceGenerator(Scenario(), start_ms=-1)


def test_simulated_clock_spaces_root_ends_by_one_over_rate() -> None:
    generator = TraceGenerator(Scenario(), start_ms=ALIGNED_START_MS, rate=4.0)
    ends = [t.end_ms for t in generator.generate(5)]
    assert ends == [ALIGNED_START_MS + 250 * i for i in range(5)]


# Truth -------------------------------------------------------------------------------------


def catalogue_nanos(span: Span, values: dict[str, Any]) -> int | None:
    """What genai-prices itself says the call cost when it ended, rounded half up to 1e-9
    USD; None for a model it does not know (asked with the provider, then without)."""
    call = Usage(
        input_tokens=prompt_of(values),
        cache_read_tokens=cache_read_of(values),
        cache_write_tokens=cache_write_of(values),
        output_tokens=completion_of(values),
    )
    ended = datetime.fromtimestamp(span.end_time_unix_nano // 1_000_000 / 1000, tz=UTC)
    for provider in (provider_of(values), None):
        try:
            usd = calc_price(
                call, model_of(values), provider_id=provider, genai_request_timestamp=ended
            ).total_price
        except LookupError:
            continue
        return int((usd * 10**9).to_integral_value(ROUND_HALF_UP))
    return None


def llm_costs(members: list[tuple[Span, dict[str, Any]]]) -> dict[str, float | int]:
    """The cost metrics of a window's LLM calls: a reported cost, else genai-prices' price."""
    reported = estimated = unpriced = 0
    for span, values in members:
        if "llm.cost.total" in values:
            reported += int(Decimal(repr(values["llm.cost.total"])) * 10**9)
            continue
        price = catalogue_nanos(span, values)
        if price is not None:
            estimated += price
        elif prompt_of(values) + completion_of(values) > 0:
            unpriced += 1
    return {
        "cost_usd": (reported + estimated) / 1e9,
        "cost_reported_usd": reported / 1e9,
        "cost_estimated_usd": estimated / 1e9,
        "unpriced_llm_calls": unpriced,
    }


def brute_force_groups(
    traces: list[GeneratedTrace], window_ms: int
) -> dict[tuple[int, str], list[tuple[Span, bool]]]:
    """Each (window, agent)'s spans, each with whether it is an invocation: the product's
    rules applied as literally as possible to the decoded spans. Every span is in its agent's
    group and in ``ALL_AGENTS``' of the same window."""
    groups: dict[tuple[int, str], list[tuple[Span, bool]]] = defaultdict(list)
    for trace in traces:
        spans = decoded_spans(trace)
        by_id = {span.span_id: span for span in spans}

        def agent_of(span: Span, by_id: dict[bytes, Span] = by_id) -> str:
            while True:
                own = attributes(span).get("agent.name")
                if own:
                    return str(own)
                if span.parent_span_id not in by_id:
                    return "agent-app"  # the resource's service.name
                span = by_id[span.parent_span_id]

        for span in spans:
            agent = agent_of(span)
            parent = by_id.get(span.parent_span_id)
            invocation = parent is None or agent_of(parent) != agent
            window = math.floor(span.end_time_unix_nano / 1_000_000 / window_ms) * window_ms
            groups[(window, agent)].append((span, invocation))
            groups[(window, ALL_AGENTS)].append((span, invocation))
    return groups


def invocation_latencies(members: list[tuple[Span, bool]]) -> list[float]:
    return [
        (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6
        for span, invocation in members
        if invocation
    ]


def brute_force_rollups(traces: list[GeneratedTrace], window_ms: int) -> list[dict[str, Any]]:
    """The product's rules, applied as literally as possible to the decoded spans."""
    rollups = []
    for (window, agent), members in sorted(brute_force_groups(traces, window_ms).items()):
        latencies = sorted(invocation_latencies(members))

        def quantile(q: Fraction, latencies: list[float] = latencies) -> float | None:
            return latencies[math.floor(q * (len(latencies) - 1))] if latencies else None

        calls = [
            (span, attributes(span)) for span, _ in members if kind_of(attributes(span)) == "LLM"
        ]
        llm = [values for _, values in calls]
        errors = sum(span.status.code == Status.STATUS_CODE_ERROR for span, _ in members)
        rollups.append(
            {
                "agent": agent,
                "window_start_ms": window,
                "window_end_ms": window + window_ms,
                "spans": len(members),
                "errors": errors,
                "error_rate": errors / len(members),
                "invocations": len(latencies),
                "latency_p50_ms": quantile(Fraction(1, 2)),
                "latency_p95_ms": quantile(Fraction(95, 100)),
                "latency_p99_ms": quantile(Fraction(99, 100)),
                "latency_max_ms": max(latencies) if latencies else None,
                "llm_calls": len(llm),
                "tokens_prompt": sum(prompt_of(a) for a in llm),
                "tokens_completion": sum(completion_of(a) for a in llm),
                # GenAI spans have no total: it is prompt + completion.
                "tokens_total": sum(prompt_of(a) + completion_of(a) for a in llm),
                "tokens_cache_read": sum(cache_read_of(a) for a in llm),
                "tokens_cache_write": sum(cache_write_of(a) for a in llm),
                "tokens_reasoning": sum(reasoning_of(a) for a in llm),
                **llm_costs(calls),
                "duplicate_spans": 0,  # each span published once
            }
        )
    return rollups


@pytest.mark.parametrize(
    ("window_ms", "trace_size", "rate"),
    [(60_000, 20, 20.0), (10_000, 60, 5.0), (1_000, 12, 50.0)],
)
def test_truth_equals_a_brute_force_recount_of_the_published_bytes(
    window_ms: int, trace_size: int, rate: float
) -> None:
    generator = TraceGenerator(
        Scenario(trace_size=trace_size, error_rate=0.1, seed=5),
        start_ms=ALIGNED_START_MS,
        rate=rate,
    )
    traces = list(generator.generate(150))
    truth = Truth.from_traces(traces, window_size_ms=window_ms)
    expected = brute_force_rollups(traces, window_ms)
    assert len(truth.rollups) == len(expected) > 1
    # Costs too are exact: both sides sum integer nano-USD and divide once. The all-agents
    # series is recounted the same way, so it is checked here too.
    assert truth.rollups == expected
    agents = [r for r in truth.rollups if r["agent"] != ALL_AGENTS]
    everyone = [r for r in truth.rollups if r["agent"] == ALL_AGENTS]
    assert len({r["window_start_ms"] for r in agents}) == len(everyone)
    total = Counter[str]()
    for rollup in agents:
        total.update({k: v for k, v in rollup.items() if k.startswith(("cost_", "unpriced"))})
    # The traffic exercises every kind of cost.
    assert total["cost_reported_usd"] > 0 and total["cost_estimated_usd"] > 0
    assert total["unpriced_llm_calls"] > 0
    assert truth.span_count == sum(t.span_count for t in traces)
    assert truth.trace_count == len(traces)
    for series in (agents, everyone):
        assert sum(r["spans"] for r in series) == truth.span_count
        assert sum(r["errors"] for r in series) == sum(t.error_count for t in traces)


def test_truth_prices_like_the_worker_a_reported_cost_wins_and_unknown_models_are_unpriced() -> (
    None
):
    request = ExportTraceServiceRequest()
    scope_spans = request.resource_spans.add().scope_spans.add()
    end_ns = ALIGNED_START_MS * 1_000_000 + 5_000_000_000

    def llm_span(number: int, values: dict[str, str | int | float]) -> None:
        span = scope_spans.spans.add(trace_id=b"\x01" * 16, span_id=bytes([number]) * 8)
        span.start_time_unix_nano, span.end_time_unix_nano = end_ns - 1_000_000_000, end_ns
        span.attributes.add(key="agent.name").value.string_value = "solo"
        for key, value in values.items():
            target = span.attributes.add(key=key).value
            if isinstance(value, str):
                target.string_value = value
            elif isinstance(value, int):
                target.int_value = value
            else:
                target.double_value = value

    llm = "openinference.span.kind"
    # A reported cost wins over the table's price.
    llm_span(1, {llm: "LLM", "llm.model_name": "gpt-4o", "llm.provider": "openai",
                 "llm.token_count.prompt": 1000, "llm.token_count.completion": 200,
                 "llm.cost.total": 0.5})  # fmt: skip
    # Claude Sonnet 4 at its list rates (USD per million): 3 input, 0.30 cache read, 3.75
    # cache write, 15 output: 500 * 3 + 400 * 0.30 + 100 * 3.75 + 200 * 15 = 4995.
    llm_span(2, {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
                 "gen_ai.request.model": "claude-sonnet-4-20250514",
                 "gen_ai.usage.input_tokens": 1000, "gen_ai.usage.output_tokens": 200,
                 "gen_ai.usage.cache_read.input_tokens": 400,
                 "gen_ai.usage.cache_creation.input_tokens": 100,
                 "gen_ai.usage.reasoning.output_tokens": 50})  # fmt: skip
    # Tokens but no model: unpriced. A model no table knows but no tokens: free, not unpriced.
    llm_span(3, {llm: "LLM", "llm.token_count.prompt": 10})
    llm_span(4, {llm: "LLM", "llm.model_name": "in-house-llm-v2"})
    # A cost reported as an int, even 0, is still a reported cost.
    llm_span(5, {llm: "LLM", "llm.model_name": "gpt-4o", "llm.token_count.prompt": 7,
                 "llm.cost.total": 0})  # fmt: skip
    builder = TruthBuilder(WINDOW_MS)
    builder.add_request(request)
    everyone, rollup = builder.build().rollups
    # One agent: the all-agents series holds the same numbers.
    assert (everyone["agent"], rollup["agent"]) == (ALL_AGENTS, "solo")
    assert everyone == {**rollup, "agent": ALL_AGENTS}
    assert rollup["llm_calls"] == 5
    assert rollup["tokens_prompt"] == 2017
    assert rollup["tokens_total"] == 2417
    assert (rollup["tokens_cache_read"], rollup["tokens_cache_write"]) == (400, 100)
    assert rollup["tokens_reasoning"] == 50
    assert rollup["cost_reported_usd"] == 0.5
    assert rollup["cost_estimated_usd"] == 0.004995
    assert rollup["cost_usd"] == 0.504995
    assert rollup["unpriced_llm_calls"] == 1


def test_tokens_repeated_on_chain_spans_are_not_counted_twice() -> None:
    traces = generate(100, trace_size=30)
    on_llm = on_chain = 0
    for trace in traces:
        for span in decoded_spans(trace):
            values = attributes(span)
            if kind_of(values) == "LLM":
                on_llm += prompt_of(values) + completion_of(values)
            elif kind_of(values) == "CHAIN":
                on_chain += values.get("llm.token_count.total", 0)
    assert on_chain > 0, "the generator must exercise the double-counting trap"
    truth = Truth.from_traces(traces)
    for everyone in (False, True):
        series = [r for r in truth.rollups if (r["agent"] == ALL_AGENTS) == everyone]
        assert sum(r["tokens_total"] for r in series) == on_llm


def test_nested_same_agent_spans_are_not_extra_invocations() -> None:
    # A specialist that hands a step to itself (a recursive subgraph) makes an AGENT span whose
    # parent has the same agent: by the rules that is not a new invocation.
    traces = generate(300, trace_size=60)
    agent_spans = nested_same_agent = 0
    for trace in traces:
        spans = decoded_spans(trace)
        by_id = {span.span_id: span for span in spans}
        for span in spans:
            name = attributes(span).get("agent.name")
            if name is None:
                continue
            agent_spans += 1
            ancestor = by_id.get(span.parent_span_id)
            while ancestor is not None and "agent.name" not in attributes(ancestor):
                ancestor = by_id.get(ancestor.parent_span_id)
            if ancestor is not None and attributes(ancestor)["agent.name"] == name:
                nested_same_agent += 1
    assert nested_same_agent > 0
    truth = Truth.from_traces(traces)
    for everyone in (False, True):
        series = [r for r in truth.rollups if (r["agent"] == ALL_AGENTS) == everyone]
        assert sum(r["invocations"] for r in series) == agent_spans - nested_same_agent


@pytest.mark.parametrize(
    ("end_ns", "window_ms", "start_ms"),
    [
        (0, 60_000, 0),
        (60_000 * 1_000_000, 60_000, 60_000),  # ends exactly on a boundary: the next window
        (60_000 * 1_000_000 - 1, 60_000, 0),  # one nanosecond earlier: the previous one
        (59_999_999_999, 60_000, 0),
        (1_700_000_040_000_000_000, 60_000, 1_700_000_040_000),
        (1_700_000_039_999_999_999, 60_000, 1_699_999_980_000),
        (12_345_678_901, 1_000, 12_000),
    ],
)
def test_window_start_table(end_ns: int, window_ms: int, start_ms: int) -> None:
    assert window_start_ms(end_ns, window_ms) == start_ms


@given(
    end_ns=st.integers(min_value=0, max_value=2**63 - 1),
    window_ms=st.integers(min_value=1, max_value=86_400_000),
)
def test_window_holds_the_end_time(end_ns: int, window_ms: int) -> None:
    start = window_start_ms(end_ns, window_ms)
    assert start % window_ms == 0
    assert start <= end_ns // 1_000_000 < start + window_ms


def test_a_trace_ending_on_a_window_boundary_is_counted_in_the_window_it_opens() -> None:
    generator = TraceGenerator(Scenario(seed=1), start_ms=ALIGNED_START_MS, rate=1.0)
    boundary_ns = ALIGNED_START_MS * 1_000_000
    on_boundary = generator.trace(0, end_ns=boundary_ns)
    just_before = generator.trace(1, end_ns=boundary_ns - 1)
    truth = Truth.from_traces([on_boundary], window_size_ms=WINDOW_MS)
    rollup = truth.rollup("orchestrator", ALIGNED_START_MS)
    assert rollup is not None and rollup["invocations"] == 1
    truth = Truth.from_traces([just_before], window_size_ms=WINDOW_MS)
    rollup = truth.rollup("orchestrator", ALIGNED_START_MS - WINDOW_MS)
    assert rollup is not None and rollup["invocations"] == 1
    assert truth.rollup("orchestrator", ALIGNED_START_MS) is None


@pytest.mark.parametrize(
    ("n", "percent", "index"),
    [(1, 99, 0), (2, 50, 0), (20, 95, 18), (21, 95, 19), (101, 99, 99), (100, 50, 49)],
)
def test_lower_quantile_picks_the_lower_order_statistic(n: int, percent: int, index: int) -> None:
    values = [float(i) for i in range(n)]
    assert lower_quantile(values, percent) == values[index]


def test_truth_file_round_trips() -> None:
    truth = Truth.from_traces(generate(30), window_size_ms=10_000)
    again = Truth.from_json(truth.to_json())
    assert again == truth
    assert again.rollups == sorted(truth.rollups, key=lambda r: (r["window_start_ms"], r["agent"]))


# Lateness and pacing -----------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    ends=st.lists(st.integers(min_value=0, max_value=100_000), min_size=1, max_size=60),
    fraction=st.floats(min_value=0.0, max_value=1.0),
    max_delay_ms=st.integers(min_value=1, max_value=30_000),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_late_traces_come_out_once_and_no_earlier_than_their_delay(
    ends: list[int], fraction: float, max_delay_ms: int, seed: int
) -> None:
    ends.sort()
    reorderer: LateReorderer[_Stamped] = LateReorderer(
        fraction=fraction, max_delay_ms=max_delay_ms, seed=seed
    )
    published: list[tuple[_Stamped, int, float]] = []  # (trace, delay, newest end fed so far)
    for i, end in enumerate(ends):
        for trace, delay in reorderer.push(_Stamped(i, end)):
            published.append((trace, delay, end))
    for trace, delay in reorderer.drain():
        published.append((trace, delay, math.inf))
    assert sorted(trace.index for trace, _, _ in published) == list(range(len(ends)))
    for trace, delay, newest in published:
        assert 0 <= delay <= max_delay_ms
        if delay:
            assert newest >= trace.end_ms + delay
    if fraction == 0.0:
        assert [trace.index for trace, _, _ in published] == list(range(len(ends)))


class _Stamped:
    def __init__(self, index: int, end_ms: int) -> None:
        self.index = index
        self.end_ms = end_ms


def test_realtime_traces_keep_the_rate_and_end_at_the_wall_clock() -> None:
    now = [1_000.0]
    wall_ns = [ALIGNED_START_MS * 1_000_000]

    async def sleep(seconds: float) -> None:
        now[0] += seconds
        wall_ns[0] += round(seconds * 1e9)

    async def collect() -> list[GeneratedTrace]:
        generator = TraceGenerator(Scenario(seed=2), start_ms=0, rate=4.0)
        stream = realtime_traces(
            generator,
            rate=4.0,
            count=None,
            duration_s=2.0,
            wall_clock_ns=lambda: wall_ns[0],
            monotonic_s=lambda: now[0],
            sleep=sleep,
        )
        return [trace async for trace in stream]

    traces = asyncio.run(collect())
    assert len(traces) == 8  # 2 s at 4 traces/s
    assert [t.end_ms for t in traces] == [ALIGNED_START_MS + 250 * i for i in range(8)]


def test_upstream_sampling_keeps_whole_traces_by_trace_id_and_marks_their_th() -> None:
    traces = list(TraceGenerator(Scenario(seed=5), start_ms=ALIGNED_START_MS).generate(2_000))
    sampler = UpstreamSampler(0.25)
    kept = [s for t in traces if (s := sampler.sample(t)) is not None]
    sigma = math.sqrt(len(traces) * 0.25 * 0.75)
    assert abs(len(kept) - 0.25 * len(traces)) < 4 * sigma
    again = [s for t in traces if (s := UpstreamSampler(0.25).sample(t)) is not None]
    assert [t.trace_id for t in again] == [t.trace_id for t in kept]  # consistent
    for trace in kept[:50]:
        request = ExportTraceServiceRequest.FromString(trace.payload)
        spans = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
        assert len(spans) == trace.span_count
        assert {s.trace_state for s in spans} == {"ot=th:c"}
