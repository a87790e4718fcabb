"""Throughput of the pure core on one core: decode + extract, and aggregation (the aggregate role).

Prints spans per second; asserts nothing. Run from the project root:

    .venv/bin/python benchmarks/bench_core.py [--messages 300] [--repeat 5]

The messages look like what a LangChain agent instrumented with OpenInference emits: 100 spans
each (one AGENT span per trace, CHAIN, TOOL and LLM spans below it), about ten attributes per
span, LLM and CHAIN spans carrying multi-kilobyte ``input.value``/``output.value`` strings.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from processor.core.decoding import decode_spans
from processor.core.partition import PartitionAggregator
from processor.core.pricing import PriceTable
from processor.core.semconv import ExtractionConfig
from processor.core.spans import SpanRecord

SPANS_PER_MESSAGE = 100
SPANS_PER_TRACE = 10
AGENTS = [f"agent-{n}" for n in range(10)]
START_NS = 1_700_000_000_000_000_000


def _kv(key: str, value: str | int | float) -> KeyValue:
    if isinstance(value, str):
        return KeyValue(key=key, value=AnyValue(string_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(double_value=value))


def _text(rng: random.Random, size: int) -> str:
    words = ["the", "agent", "searched", "for", "flights", "to", "Lisbon", "and", "found", "3"]
    return " ".join(rng.choice(words) for _ in range(size // 5))


def _span(rng: random.Random, trace: int, index: int, t0_ns: int) -> Span:
    trace_id = (trace + 1).to_bytes(16, "big")
    span_id = (trace * 1000 + index + 1).to_bytes(8, "big")
    parent = b"" if index == 0 else (trace * 1000 + 1).to_bytes(8, "big")
    agent = AGENTS[trace % len(AGENTS)]
    start = t0_ns + index * 1_000_000
    end = start + rng.randint(1, 2_000) * 1_000_000
    kind = "AGENT" if index == 0 else rng.choice(["LLM", "LLM", "CHAIN", "TOOL"])
    attrs: list[KeyValue] = [
        _kv("openinference.span.kind", kind),
        _kv("session.id", f"session-{trace % 50}"),
        _kv("user.id", f"user-{trace % 20}"),
        _kv("metadata", '{"ls_provider": "openai", "ls_model_type": "chat"}'),
    ]
    if index == 0:
        attrs.append(_kv("agent.name", agent))
    if kind == "LLM":
        attrs += [
            _kv("llm.model_name", "gpt-4o-mini"),
            _kv("llm.token_count.prompt", rng.randint(100, 4_000)),
            _kv("llm.token_count.completion", rng.randint(10, 800)),
            _kv("llm.token_count.total", 0),
            _kv("llm.invocation_parameters", '{"temperature": 0.2, "max_tokens": 1024}'),
            _kv("input.value", _text(rng, 2_000)),
            _kv("output.value", _text(rng, 600)),
        ]
    elif kind == "TOOL":
        attrs += [
            _kv("tool.name", "search_flights"),
            _kv("input.value", '{"origin": "BER", "destination": "LIS"}'),
            _kv("output.value", _text(rng, 300)),
        ]
    else:
        attrs += [
            _kv("input.value", _text(rng, 1_500)),
            _kv("output.value", _text(rng, 400)),
            _kv("input.mime_type", "text/plain"),
        ]
    return Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        name=f"{kind.lower()}-{index}",
        kind=Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=start,
        end_time_unix_nano=end,
        attributes=attrs,
        status=Status(
            code=Status.STATUS_CODE_ERROR if rng.random() < 0.02 else Status.STATUS_CODE_UNSET
        ),
    )


def build_messages(count: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    messages = []
    trace = 0
    for message in range(count):
        request = ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add()
        resource_spans.resource.attributes.append(_kv("service.name", "travel-agents"))
        scope_spans = resource_spans.scope_spans.add()
        scope_spans.scope.name = "openinference.instrumentation.langchain"
        t0 = START_NS + message * 50_000_000
        for _ in range(SPANS_PER_MESSAGE // SPANS_PER_TRACE):
            # children first: they end, and so are exported, before their parent
            spans = [_span(rng, trace, index, t0) for index in range(SPANS_PER_TRACE)]
            scope_spans.spans.extend(spans[1:] + spans[:1])
            trace += 1
        messages.append(request.SerializeToString())
    return messages


def _best_rate(run: Callable[[], int], repeat: int) -> tuple[float, float]:
    # CPU time of this process: the rate of one core, even on a machine busy with other work
    rates = []
    for _ in range(repeat):
        began = time.process_time()
        spans = run()
        rates.append(spans / (time.process_time() - began))
    return max(rates), statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    config = ExtractionConfig(dimension_attributes=("session.id",), prices=PriceTable())
    # The same without a price table: LLM spans without a reported cost stay unpriced. The
    # two rates, measured in one run, are what pricing costs.
    unpriced = ExtractionConfig(dimension_attributes=("session.id",))
    messages = build_messages(args.messages)
    mean_bytes = sum(map(len, messages)) / len(messages)

    def decoder(extraction: ExtractionConfig) -> Callable[[], int]:
        def decode_all() -> int:
            count = 0
            for payload in messages:
                count += len(decode_spans(payload, "application/x-protobuf", extraction).spans)
            return count

        return decode_all

    records: list[list[SpanRecord]] = []
    for payload in messages:
        records.append(decode_spans(payload, None, config).spans)

    def aggregate_all() -> int:
        aggregator = PartitionAggregator(
            0, window_size_ms=60_000, allowed_lateness_ms=5_000, idle_timeout_ms=30_000
        )
        count = 0
        for offset, spans in enumerate(records):
            aggregator.add(offset, spans, now_ms=offset)
            count += len(spans)
        return count

    print(
        f"{len(messages)} messages x {SPANS_PER_MESSAGE} spans, "
        f"mean message {mean_bytes / 1024:.0f} KiB"
    )
    for name, run in (
        ("decode_spans", decoder(config)),
        ("decode_spans, no price table", decoder(unpriced)),
        ("PartitionAggregator.add", aggregate_all),
    ):
        best, median = _best_rate(run, args.repeat)
        print(f"{name:32s} best {best:>10,.0f} spans/s   median {median:>10,.0f} spans/s")


if __name__ == "__main__":
    main()
