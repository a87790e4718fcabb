"""Generated traces as OTLP: one `ExportTraceServiceRequest` per trace, as an SDK would send it.

Pure and deterministic: trace number ``i`` of a scenario is a function of the seed, ``i`` and
the end time it is given, nothing else. The simulated clock of `TraceGenerator.generate` spaces
traces ``1/rate`` seconds apart; a real-time caller passes its own end times to `trace`.

Spans use OpenInference's attribute names, as LangChain's instrumentation writes them, except a
share of LLM calls that use the OpenTelemetry GenAI conventions' (``gen_ai.*``, no span kind,
no cost): a processor has to read both.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Span, Status

from processor.loadgen.payloads import PayloadWriter
from processor.loadgen.scenario import Scenario, llm_cost_usd, model_price
from processor.loadgen.trace_shape import Convention, SpanNode, TraceShaper

SCOPE_NAME = "openinference.instrumentation.langchain"
SCOPE_VERSION = "0.1.29"
_NS_PER_MS = 1_000_000
_NS_PER_S = 1_000_000_000
# A GenAI-convention LLM span is a chat call; the worker takes ``chat`` as an LLM operation.
GENAI_OPERATION = "chat"


@dataclass(frozen=True, slots=True)
class _UsageNames:
    """Where a convention writes an LLM call's usage; the GenAI conventions have no total."""

    prompt: str
    completion: str
    total: str | None
    cache_read: str
    cache_write: str
    reasoning: str


# Spelled out here rather than taken from ``processor.core.semconv``: a misspelling there
# then shows up as a disagreement with the truth instead of being shared by both.
_USAGE_NAMES: dict[Convention, _UsageNames] = {
    "openinference": _UsageNames(
        prompt="llm.token_count.prompt",
        completion="llm.token_count.completion",
        total="llm.token_count.total",
        cache_read="llm.token_count.prompt_details.cache_read",
        cache_write="llm.token_count.prompt_details.cache_write",
        reasoning="llm.token_count.completion_details.reasoning",
    ),
    "genai": _UsageNames(
        prompt="gen_ai.usage.input_tokens",
        completion="gen_ai.usage.output_tokens",
        total=None,
        cache_read="gen_ai.usage.cache_read.input_tokens",
        cache_write="gen_ai.usage.cache_creation.input_tokens",
        reasoning="gen_ai.usage.reasoning.output_tokens",
    ),
}

_QUESTIONS = (
    "Compare last quarter's churn by region and draft a summary for the board.",
    "Find the bug in the retry loop of the payment client and propose a patch.",
    "Translate the onboarding guide into German and check the terminology.",
    "Which customers renewed after the price change? Give me the SQL too.",
    "Plan a three-day offsite for twelve people in Lisbon under 9k EUR.",
    "Summarise the open incidents and rank them by customer impact.",
)


@dataclass(frozen=True, slots=True)
class GeneratedTrace:
    """One trace, ready to publish as one Kafka message.

    ``request`` holds exactly this trace's spans (one ResourceSpans, one ScopeSpans), in the
    order an SDK exports them: by end time, the root last; ``span_ids`` follow that order.
    ``payload`` is its serialization. ``end_ms`` is the root's end time (the latest in the
    trace), floored to ms. Holding the request costs about 1 KB per span; a long run should
    keep only payloads and feed a `TruthBuilder` as it goes.
    """

    index: int
    trace_id: bytes
    span_ids: list[bytes]
    request: ExportTraceServiceRequest
    payload: bytes
    end_ms: int
    error_count: int

    @property
    def trace_id_hex(self) -> str:
        return self.trace_id.hex()

    @property
    def span_count(self) -> int:
        return len(self.span_ids)

    @property
    def has_error(self) -> bool:
        return self.error_count > 0


class TraceGenerator:
    """Generates the traces of one scenario on a simulated clock.

    Trace ``i`` of `generate` has its root span end at ``start_ms + i / rate`` seconds, so a
    run of ``count`` traces covers ``count / rate`` seconds of event time.
    """

    def __init__(self, scenario: Scenario, *, start_ms: int, rate: float = 50.0) -> None:
        if start_ms < 0:
            raise ValueError(f"start_ms must be >= 0, got {start_ms}")
        if not rate > 0:
            raise ValueError(f"rate must be > 0 traces/s, got {rate}")
        self.scenario = scenario
        self.start_ms = start_ms
        self.rate = rate
        self._shaper = TraceShaper(scenario)
        self._encoder = _OtlpEncoder(
            scenario.service_name, scenario.seed if scenario.payloads == "realistic" else None
        )

    def end_ns_of(self, index: int) -> int:
        """The simulated clock: when trace ``index``'s root span ends."""
        return self.start_ms * _NS_PER_MS + round(index * _NS_PER_S / self.rate)

    def generate(self, count: int, *, first_index: int = 0) -> Iterator[GeneratedTrace]:
        """``count`` traces on the simulated clock, in event-time order."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        for index in range(first_index, first_index + count):
            yield self.trace(index, end_ns=self.end_ns_of(index))

    def trace(self, index: int, *, end_ns: int) -> GeneratedTrace:
        """Trace number ``index`` of this scenario, its root span ending at ``end_ns``."""
        # Each trace has its own RNG, so trace i is the same whatever came before it, and
        # traces can be generated out of order or in several processes.
        rng = random.Random(f"loadgen-trace/{self.scenario.seed}/{index}")
        root = self._shaper.shape(rng, end_ns)
        return self._encoder.encode(rng, index, root)


class _OtlpEncoder:
    """Turns a shaped trace tree into an OTLP request. Ids come from the trace's RNG."""

    def __init__(self, service_name: str, payload_seed: int | None) -> None:
        """``payload_seed``: the scenario's seed when spans carry realistic payloads."""
        self._service_name = service_name
        self._payload_seed = payload_seed
        self._constant_attribute_cache: dict[
            tuple[str, str | None, str | None, str | None, Convention], tuple[KeyValue, ...]
        ] = {}

    def encode(self, rng: random.Random, index: int, root: SpanNode) -> GeneratedTrace:
        trace_id = _nonzero_id(rng, 16)
        nodes = root.walk()
        span_ids = _unique_span_ids(rng, len(nodes))
        span_id_of = dict(zip(nodes, span_ids, strict=True))
        session_id = f"session-{rng.getrandbits(48):012x}"
        question = rng.choice(_QUESTIONS)
        payloads = None if self._payload_seed is None else PayloadWriter(self._payload_seed, index)

        request = ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add()
        resource_attributes = resource_spans.resource.attributes
        resource_attributes.add(key="service.name").value.string_value = self._service_name
        resource_attributes.add(key="telemetry.sdk.language").value.string_value = "python"
        resource_attributes.add(key="telemetry.sdk.name").value.string_value = "opentelemetry"
        scope_spans: ScopeSpans = resource_spans.scope_spans.add()
        scope_spans.scope.name = SCOPE_NAME
        scope_spans.scope.version = SCOPE_VERSION

        parent_id_of = {child: span_id_of[node] for node in nodes for child in node.children}

        emitted_ids: list[bytes] = []
        error_count = 0
        spans = scope_spans.spans
        # An SDK's batch processor exports spans as they end: children before their parents.
        for node in sorted(nodes, key=lambda n: (n.end_ns, -n.depth)):
            span_id = span_id_of[node]
            emitted_ids.append(span_id)
            # Field-by-field assignment and `attributes.add()` are about twice as fast in upb
            # as building KeyValue/Span objects and appending them.
            span = spans.add()
            span.trace_id = trace_id
            span.span_id = span_id
            if node is not root:
                span.parent_span_id = parent_id_of[node]
            span.name = node.name
            span.kind = Span.SPAN_KIND_CLIENT if node.kind == "LLM" else Span.SPAN_KIND_INTERNAL
            span.start_time_unix_nano = node.start_ns
            span.end_time_unix_nano = node.end_ns
            attributes = span.attributes
            attributes.extend(self._constant_attributes(node))
            if node is root:
                attributes.add(key="session.id").value.string_value = session_id
                attributes.add(key="input.value").value.string_value = question
            _add_usage(attributes, node)
            if payloads is not None:
                ok = node.error_message is None
                if node.kind == "LLM":
                    payloads.add_llm(attributes, genai=node.convention == "genai", ok=ok)
                elif node is root:  # its input is the question
                    if ok:
                        attributes.add(key="output.value").value.string_value = payloads.text()
                elif node.kind == "AGENT":
                    payloads.add_agent(attributes, ok=ok)
            if node.error_message is None:
                span.status.code = Status.STATUS_CODE_OK
                continue
            error_count += 1
            span.status.code = Status.STATUS_CODE_ERROR
            span.status.message = node.error_message
            exception_type, _, exception_message = node.error_message.partition(": ")
            event = span.events.add()
            event.time_unix_nano = node.end_ns
            event.name = "exception"
            event.attributes.add(key="exception.type").value.string_value = exception_type
            event.attributes.add(key="exception.message").value.string_value = exception_message
            if node.convention == "genai":
                # The GenAI conventions name the failure on the span itself.
                attributes.add(key="error.type").value.string_value = exception_type
        return GeneratedTrace(
            index=index,
            trace_id=trace_id,
            span_ids=emitted_ids,
            request=request,
            payload=request.SerializeToString(),
            end_ms=root.end_ns // _NS_PER_MS,
            error_count=error_count,
        )

    def _constant_attributes(self, node: SpanNode) -> tuple[KeyValue, ...]:
        """The attributes that depend only on what the span is, built once per kind of span."""
        signature = (node.kind, node.agent_name, node.model, node.tool, node.convention)
        cached = self._constant_attribute_cache.get(signature)
        if cached is None:
            pairs: list[tuple[str, str]] = []
            if node.convention == "genai":
                # A GenAI-convention span says what it is by its operation, not a span kind.
                assert node.model is not None
                pairs.append(("gen_ai.operation.name", GENAI_OPERATION))
                pairs.append(("gen_ai.provider.name", model_price(node.model).provider))
                pairs.append(("gen_ai.request.model", node.model))
            else:
                pairs.append(("openinference.span.kind", node.kind))
                if node.model is not None:
                    pairs.append(("llm.model_name", node.model))
                    pairs.append(("llm.provider", model_price(node.model).provider))
            if node.agent_name is not None:
                pairs.append(("agent.name", node.agent_name))
            if node.tool is not None:
                pairs.append(("tool.name", node.tool))
            cached = tuple(_string_attribute(key, value) for key, value in pairs)
            self._constant_attribute_cache[signature] = cached
        return cached


def _add_usage(attributes: RepeatedCompositeFieldContainer[KeyValue], node: SpanNode) -> None:
    """Token counts and cost: on successful LLM calls (the cost only where the call reports
    one), and the counts repeated on some CHAIN spans."""
    if node.has_tokens:
        assert node.model is not None
        counted = [node]
        names = _USAGE_NAMES[node.convention]
        cost = (
            llm_cost_usd(
                node.model, node.prompt_tokens, node.completion_tokens, node.cache_read_tokens
            )
            if node.reports_cost
            else None
        )
        if node.convention == "genai":
            # Part of the response, so only on calls that returned one.
            attributes.add(key="gen_ai.response.model").value.string_value = node.model
    elif node.kind == "CHAIN" and node.repeats_child_tokens:
        counted = [child for child in node.children if child.has_tokens]
        if not counted:
            return
        # The chain's span comes from LangChain's instrumentation whatever its LLM's did.
        names = _USAGE_NAMES["openinference"]
        cost = None
    else:
        return
    prompt = sum(call.prompt_tokens for call in counted)
    completion = sum(call.completion_tokens for call in counted)
    attributes.add(key=names.prompt).value.int_value = prompt
    attributes.add(key=names.completion).value.int_value = completion
    if names.total is not None:
        attributes.add(key=names.total).value.int_value = prompt + completion
    # Instrumentations write the details only when the provider reported some.
    for name, count in (
        (names.cache_read, sum(call.cache_read_tokens for call in counted)),
        (names.cache_write, sum(call.cache_write_tokens for call in counted)),
        (names.reasoning, sum(call.reasoning_tokens for call in counted)),
    ):
        if count:
            attributes.add(key=name).value.int_value = count
    if cost is not None:
        attributes.add(key="llm.cost.total").value.double_value = cost


def _string_attribute(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def _nonzero_id(rng: random.Random, size: int) -> bytes:
    # All-zero ids are invalid in OTLP; the loop runs twice once in 2**64 traces.
    while True:
        value = rng.getrandbits(8 * size)
        if value:
            return value.to_bytes(size, "big")


def _unique_span_ids(rng: random.Random, count: int) -> list[bytes]:
    ids: list[bytes] = []
    seen: set[bytes] = set()
    while len(ids) < count:
        span_id = _nonzero_id(rng, 8)
        if span_id not in seen:
            seen.add(span_id)
            ids.append(span_id)
    return ids
