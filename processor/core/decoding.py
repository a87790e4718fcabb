"""Decode OTLP trace export requests (protobuf or JSON) into validated span records.

``decode_request`` turns bytes into an ``ExportTraceServiceRequest`` or raises ``DecodeError``
with a reason; ``extract_spans`` validates every span and pulls out what the rest of the
pipeline needs. A span that breaks a rule is returned as a ``RejectedSpan``, never dropped.

Reasons (stable, used as dead-letter headers and metric labels):
``empty_message``, ``message_too_large``, ``unsupported_content_type``, ``invalid_protobuf``,
``invalid_json``, ``not_otlp_traces``, ``too_many_spans``, ``missing_trace_id``,
``missing_span_id``, ``invalid_parent_span_id``, ``end_before_start``, ``attribute_too_large``,
``absurd_value`` (a token count, cost or upstream sampling rate no real call can have: it
would overflow the sums).

A span whose tracestate carries an upstream sampling threshold (``ot=th:...``) gets its
adjusted count as ``extra_weight``: its counts are scaled by it (rule 1 of the design).
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Mapping
from functools import partial
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError as ProtobufDecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from processor.core import semconv
from processor.core.sampling.threshold import MAX_ADJUSTED_COUNT, extra_weight
from processor.core.sampling.tracestate import parse_tracestate
from processor.core.sketch import WEIGHT_ONE
from processor.core.slim_otlp import SlimRequest
from processor.core.spans import (
    COST_NANOS_PER_USD,
    NANOS_PER_MILLI,
    DecodedMessage,
    MessageSource,
    RejectedSpan,
    SpanOrigin,
    SpanRecord,
)
from processor.errors import DecodeError

PROTOBUF_CONTENT_TYPES = frozenset({"application/x-protobuf", "application/protobuf"})
JSON_CONTENT_TYPES = frozenset({"application/json"})
MAX_MESSAGE_BYTES = 64 << 20
# Per span. Far above any real model call, far below what would overflow the unsigned 64-bit
# sums of a window (the partial's JSON encoding cannot hold more).
MAX_TOKENS_PER_SPAN = 1 << 40
MAX_COST_USD_PER_SPAN = 1_000_000.0
MAX_COST_NANOS_PER_SPAN = int(MAX_COST_USD_PER_SPAN) * COST_NANOS_PER_USD
# A span kept upstream with a probability below 1/16384 would stand for so many spans that its
# scaled tokens could overflow the sums; no agent system samples that thinly.
MAX_UPSTREAM_ADJUSTED_COUNT = 1 << 14
_MIN_UPSTREAM_KEPT = MAX_ADJUSTED_COUNT // MAX_UPSTREAM_ADJUSTED_COUNT
_MAX_DIGITS = 20

_ZERO_TRACE_ID = bytes(16)
_ZERO_SPAN_ID = bytes(8)
_STATUS_ERROR = Status.STATUS_CODE_ERROR


def decode_spans(
    payload: bytes, content_type: str | None, config: semconv.ExtractionConfig
) -> DecodedMessage:
    """``extract_spans(decode_request(...))`` as the worker needs it, for less: a protobuf
    message is parsed once, through ``slim_otlp``, and with the OTLP classes again only when
    one of its spans goes to Phoenix or to the dead-letter topic (``MessageSource``)."""
    _check_size(payload)
    if _encoding_of(payload, content_type) == "json":
        request = _parse_json(payload)
        return extract_spans(request, config, payload=payload, content_type=content_type)
    slim = _parse_protobuf(payload, SlimRequest)
    if not slim.resource_spans:
        raise DecodeError("not_otlp_traces", "no resourceSpans in a non-empty message")
    source = MessageSource(None, payload, partial(_spans_of_payload, content_type), wire=True)
    return _extract(slim, config, source, payload_size=len(payload))


def decode_request(payload: bytes, content_type: str | None = None) -> ExportTraceServiceRequest:
    """Parse one message. The encoding comes from ``content_type``, else from the bytes."""
    _check_size(payload)
    if _encoding_of(payload, content_type) == "json":
        # An explicit ``"resourceSpans": []`` is a valid, empty request.
        return _parse_json(payload)
    request: ExportTraceServiceRequest = _parse_protobuf(payload, ExportTraceServiceRequest)
    if not request.resource_spans:
        # Non-empty bytes that parse to nothing are unknown fields only: not a trace export.
        raise DecodeError("not_otlp_traces", "no resourceSpans in a non-empty message")
    return request


def _check_size(payload: bytes) -> None:
    if not payload:
        raise DecodeError("empty_message", "the message has no bytes")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise DecodeError(
            "message_too_large", f"{len(payload)} bytes, the limit is {MAX_MESSAGE_BYTES}"
        )


def _encoding_of(payload: bytes, content_type: str | None) -> str:
    if content_type:
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type in PROTOBUF_CONTENT_TYPES:
            return "protobuf"
        if media_type in JSON_CONTENT_TYPES:
            return "json"
        raise DecodeError(
            "unsupported_content_type",
            f"{content_type!r}; send application/x-protobuf or application/json",
        )
    # No header (the Collector's Kafka exporter sets none): a protobuf
    # ExportTraceServiceRequest starts with field 1 (tag 0x0a), never with "{" or "[", so
    # anything that starts like JSON is judged as JSON and gets a JSON reason.
    return "json" if payload.lstrip()[:1] in (b"{", b"[") else "protobuf"


def _parse_protobuf(payload: bytes, message_class: Any) -> Any:
    try:
        return message_class.FromString(payload)
    except ProtobufDecodeError as exc:
        raise DecodeError("invalid_protobuf", str(exc) or "truncated or malformed") from exc


def _parse_json(payload: bytes) -> ExportTraceServiceRequest:
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("invalid_json", str(exc)) from exc
    if not isinstance(document, dict) or "resourceSpans" not in document:
        raise DecodeError("not_otlp_traces", "a JSON object with resourceSpans was expected")
    try:
        _hex_ids_to_base64(document)
        # OTLP/JSON receivers must ignore fields they do not know (newer senders add some).
        return json_format.ParseDict(
            document, ExportTraceServiceRequest(), ignore_unknown_fields=True
        )
    except (json_format.ParseError, ValueError, TypeError, AttributeError) as exc:
        raise DecodeError("not_otlp_traces", _readable_parse_error(exc)) from exc


_PARSE_STEP = re.compile(r"Failed to parse (\w+) field: ")


def _readable_parse_error(exc: Exception) -> str:
    """``resourceSpans.scopeSpans.spans.traceId: <cause>`` instead of a nested sentence."""
    text = str(exc)
    path = []
    position = 0
    while match := _PARSE_STEP.match(text, position):
        path.append(match.group(1))
        position = match.end()
    cause = text[position:].rstrip(".")[:200] or type(exc).__name__
    if not path:
        return cause
    where = ".".join(path)
    if len(where) > 120:  # a deeply nested value: the innermost fields say the most
        where = "..." + where[-117:]
    return f"{where}: {cause}"


def _hex_ids_to_base64(document: dict[str, Any]) -> None:
    """OTLP/JSON writes ids as hex; protobuf's JSON mapping expects base64 for bytes."""
    for resource_spans in document.get("resourceSpans") or ():
        for scope_spans in resource_spans.get("scopeSpans") or ():
            for span in scope_spans.get("spans") or ():
                _convert_ids(span, ("traceId", "spanId", "parentSpanId"))
                for link in span.get("links") or ():
                    _convert_ids(link, ("traceId", "spanId"))


def _convert_ids(obj: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        value = obj.get(name)
        if isinstance(value, str) and value:
            try:
                obj[name] = base64.b64encode(bytes.fromhex(value)).decode("ascii")
            except ValueError as exc:
                raise ValueError(f"{name} is not hex: {value[:40]!r}") from exc


def extract_spans(
    request: ExportTraceServiceRequest,
    config: semconv.ExtractionConfig,
    *,
    payload_size: int = 0,
    payload: bytes | None = None,
    content_type: str | None = None,
) -> DecodedMessage:
    """Validate every span of ``request`` and build records for the good ones.

    Raises ``DecodeError("too_many_spans")`` for a request over the limit; every other problem
    is per span and comes back in ``rejected``, in the order of the request.

    ``payload_size`` lets the per-attribute size check be skipped when the whole message is
    smaller than the limit (no attribute can then exceed it), which keeps the hot path short.
    With ``payload`` (the bytes ``request`` was decoded from, with their ``content_type``)
    the records' message can be released once handled (``MessageSource``); without it, the
    records hold the parsed request.
    """
    spans = [
        span
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]
    parse = partial(_spans_of_payload, content_type) if payload else None
    source = MessageSource(spans, payload, parse)
    slim = SlimRequest.FromString(request.SerializeToString())
    return _extract(slim, config, source, payload_size=len(payload) if payload else payload_size)


def _extract(
    request: Any, config: semconv.ExtractionConfig, source: MessageSource, *, payload_size: int
) -> DecodedMessage:
    """``extract_spans`` on a request read through ``slim_otlp``, whose spans ``source``
    gives back as OTLP spans (the same spans, in the same order)."""
    total = sum(
        len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans
    )
    if total > config.max_spans_per_message:
        raise DecodeError(
            "too_many_spans", f"{total} spans, the limit is {config.max_spans_per_message}"
        )
    check_sizes = payload_size == 0 or payload_size > config.max_attribute_value_bytes
    if check_sizes:
        # Sizes are checked on the attribute list as it came: a map keeps only a repeated
        # key's last value, and an earlier, oversized one would reach Phoenix unseen.
        source.hold()
    spans: list[SpanRecord] = []
    problems: list[tuple[str, str, int, SpanOrigin]] = []
    position = 0
    # Spans of one trace mostly come together: one trace id object for them all, not one
    # per span (49 bytes each, for as long as a span waits in a buffer).
    trace_ids: dict[bytes, bytes] = {}
    for resource_spans in request.resource_spans:
        # Copies: the origin outlives the parsed request, which it must not keep alive.
        resource = Resource()
        resource.CopyFrom(resource_spans.resource)
        service_name, project, resource_dimensions = resource_values(
            resource.attributes, config.dimension_attributes
        )
        for scope_spans in resource_spans.scope_spans:
            scope = InstrumentationScope()
            scope.CopyFrom(scope_spans.scope)
            origin = SpanOrigin(
                resource=resource,
                scope=scope,
                resource_schema_url=resource_spans.schema_url,
                scope_schema_url=scope_spans.schema_url,
                service_name=service_name,
                project=project,
            )
            for span in scope_spans.spans:
                outcome = _record_of(
                    span,
                    source.span_at(position) if check_sizes else None,
                    origin,
                    source,
                    position,
                    trace_ids,
                    config,
                    resource_dimensions,
                )
                if isinstance(outcome, SpanRecord):
                    spans.append(outcome)
                else:
                    problems.append((*outcome, position, origin))
                position += 1
    rejected: list[RejectedSpan] = []
    if problems:
        source.hold()  # one parse for all of them; released with the message
        rejected = [
            RejectedSpan(reason, detail, source.span_at(at), origin)
            for reason, detail, at, origin in problems
        ]
    return DecodedMessage(spans=spans, rejected=rejected, source=source)


def _spans_of_payload(content_type: str | None, payload: bytes) -> list[Span]:
    """A released message's spans, parsed again, in the order ``extract_spans`` met them."""
    request = decode_request(payload, content_type)
    return [
        span
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]


def _problem_of(
    trace_id: bytes, span_id: bytes, parent_span_id: bytes, start_ns: int, end_ns: int
) -> tuple[str, str] | None:
    if len(trace_id) != 16 or trace_id == _ZERO_TRACE_ID:
        return "missing_trace_id", f"trace id {trace_id.hex()!r} is not 16 non-zero bytes"
    if len(span_id) != 8 or span_id == _ZERO_SPAN_ID:
        return "missing_span_id", f"span id {span_id.hex()!r} is not 8 non-zero bytes"
    if len(parent_span_id) not in (0, 8):
        return "invalid_parent_span_id", f"parent span id {parent_span_id.hex()!r}"
    if end_ns < start_ns:
        return "end_before_start", f"end {end_ns} < start {start_ns}"
    return None


def _size_problem(span: Span, limit: int) -> tuple[str, str] | None:
    for kv in span.attributes:
        value = kv.value
        # ByteSize() is an upper bound of the payload (it adds a tag and a length), so the
        # exact measure is only needed for the rare value near the limit.
        if value.ByteSize() > limit and _value_bytes(value) > limit:
            return "attribute_too_large", f"attribute {kv.key!r} is over {limit} bytes"
    return None


def _value_bytes(value: AnyValue) -> int:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return len(value.string_value.encode("utf-8"))
    if kind == "bytes_value":
        return len(value.bytes_value)
    return value.ByteSize()  # arrays and key-value lists: their encoded size


def _record_of(
    span: Any,
    size_checked: Span | None,
    origin: SpanOrigin,
    source: MessageSource,
    position: int,
    trace_ids: dict[bytes, bytes],
    config: semconv.ExtractionConfig,
    resource_dimensions: dict[str, str],
) -> SpanRecord | tuple[str, str]:
    """The record of ``span`` (read through ``slim_otlp``), or the (reason, detail) of the
    rule it breaks. ``size_checked`` is the same span as OTLP reads it, when its attributes'
    sizes are to be checked."""
    # Each field of a upb message is read once: every read builds a new Python object.
    trace_id = span.trace_id
    span_id = span.span_id
    parent_span_id = span.parent_span_id
    start_ns = span.start_time_unix_nano
    end_ns = span.end_time_unix_nano
    problem = _problem_of(trace_id, span_id, parent_span_id, start_ns, end_ns)
    if problem is None and size_checked is not None:
        problem = _size_problem(size_checked, config.max_attribute_value_bytes)
    if problem is not None:
        return problem
    trace_id = trace_ids.setdefault(trace_id, trace_id)

    # The attributes as a map: only the wanted ones become Python objects.
    found: Mapping[str, AnyValue] = span.attributes

    own_agent = None
    for name in config.agent_attributes:
        value = found.get(name)
        if value is not None:
            own_agent = value.string_value or None
            if own_agent:
                break

    kind = found.get(semconv.SPAN_KIND)
    operation = found.get(semconv.GEN_AI_OPERATION)
    is_llm = (kind is not None and kind.string_value == semconv.LLM_KIND) or (
        operation is not None and operation.string_value in semconv.GEN_AI_LLM_OPERATIONS
    )
    prompt = completion = total = cost_nanos = 0
    llm: tuple[int, int, int, int, bool] | None = None
    model_key = ""
    if is_llm:
        prompt = _tokens_of(found, semconv.TOKENS_PROMPT, semconv.GEN_AI_INPUT_TOKENS)
        completion = _tokens_of(found, semconv.TOKENS_COMPLETION, semconv.GEN_AI_OUTPUT_TOKENS)
        total = _int_of(found.get(semconv.TOKENS_TOTAL)) or prompt + completion
        cache_read = _first_count(found, semconv.TOKENS_CACHE_READ)
        cache_write = _first_count(found, semconv.TOKENS_CACHE_WRITE)
        reasoning = _first_count(found, semconv.TOKENS_REASONING)
        if max(prompt, completion, total, cache_read, cache_write, reasoning) > MAX_TOKENS_PER_SPAN:
            return "absurd_value", (
                f"token counts {prompt}/{completion}/{total} (prompt/completion/total), "
                f"{cache_read}/{cache_write}/{reasoning} (cache read/cache write/reasoning), "
                f"the limit is {MAX_TOKENS_PER_SPAN}"
            )
        model = _first_string(found, semconv.MODEL_NAMES)
        provider = _first_string(found, semconv.PROVIDER_NAMES) or None
        reported = _usd_of(found.get(semconv.COST_TOTAL))
        estimated_nanos = 0
        unpriced = False
        if reported is not None:
            if not reported <= MAX_COST_USD_PER_SPAN:  # also catches an overflow to infinity
                return "absurd_value", f"cost {reported:.6g} USD for one span"
            cost_nanos = round(reported * COST_NANOS_PER_USD)
        else:
            pricing = (
                config.prices.pricing(model, provider, end_ns // NANOS_PER_MILLI)
                if model and config.prices is not None
                else None
            )
            if pricing is not None:
                estimated_nanos = cost_nanos = pricing.cost_nanos(
                    prompt,
                    completion,
                    cache_read,
                    cache_write,
                    _int_of(found.get(semconv.TOKENS_PROMPT_AUDIO)),
                    _int_of(found.get(semconv.TOKENS_COMPLETION_AUDIO)),
                )
                if cost_nanos > MAX_COST_NANOS_PER_SPAN:
                    return "absurd_value", (
                        f"cost {cost_nanos / COST_NANOS_PER_USD:.6g} USD for one span, "
                        f"priced as {pricing.model}"
                    )
            else:
                unpriced = total > 0
        llm = (cache_read, cache_write, reasoning, estimated_nanos, unpriced)
        if config.model_dimension and model:
            model_key = (
                config.prices.model_key(model, provider)
                if config.prices is not None
                else model.lower()
            )

    weight = 0
    tracestate = span.trace_state
    if "ot=" in tracestate:  # only then can it hold an upstream sampling threshold
        threshold = parse_tracestate(tracestate).threshold
        if threshold is not None and threshold != 0:
            if MAX_ADJUSTED_COUNT - threshold < _MIN_UPSTREAM_KEPT:
                return "absurd_value", (
                    f"tracestate {tracestate!r} says the span was kept with a probability "
                    f"below 1/{MAX_UPSTREAM_ADJUSTED_COUNT}"
                )
            weight = extra_weight(threshold, WEIGHT_ONE)

    dimensions: tuple[str, ...] = ()
    if config.dimension_attributes:
        dimensions = tuple(
            _dimension_of(found.get(name), resource_dimensions.get(name, ""))
            for name in config.dimension_attributes
        )
    if config.model_dimension:
        dimensions = (*dimensions, model_key)
    # Positional: one record per span, and keyword matching costs more than the rest of
    # the call. The order is SpanRecord's field order; an LLM span's own fields come last.
    record = SpanRecord(
        trace_id,
        span_id,
        parent_span_id,
        start_ns,
        end_ns,
        end_ns // NANOS_PER_MILLI,
        span.status.code == _STATUS_ERROR,
        own_agent,
        is_llm,
        prompt,
        completion,
        total,
        cost_nanos,
        dimensions,
        tracestate,
        origin,
        source,
        position,
        weight,
    )
    if llm is not None:
        (
            record.tokens_cache_read,
            record.tokens_cache_write,
            record.tokens_reasoning,
            record.cost_estimated_nanos,
            record.unpriced,
        ) = llm
    return record


def _tokens_of(found: Mapping[str, AnyValue], name: str, fallback: str) -> int:
    """OpenInference's count when the attribute is there, else the GenAI one."""
    value = found.get(name)
    return _int_of(value if value is not None else found.get(fallback))


def _first_count(found: Mapping[str, AnyValue], names: tuple[str, ...]) -> int:
    """The count of the first of ``names`` the span has (names in order of preference)."""
    for name in names:
        value = found.get(name)
        if value is not None:
            return _int_of(value)
    return 0


def _first_string(found: Mapping[str, AnyValue], names: tuple[str, ...]) -> str:
    for name in names:
        value = found.get(name)
        if value is not None and value.string_value:
            return value.string_value
    return ""


def _int_of(value: AnyValue | None) -> int:
    """A non-negative count from an int, a finite double or an ASCII digit string; else 0."""
    if value is None:
        return 0
    number = value.int_value
    if number:  # the common case, without asking which member of the oneof is set
        return number if number > 0 else 0
    kind = value.WhichOneof("value")
    if kind == "double_value":
        double = value.double_value
        return int(double) if math.isfinite(double) and double > 0 else 0
    if kind == "string_value":
        text = value.string_value.strip()
        # isdigit() alone accepts "²" and other digits int() refuses; length bounds int().
        if text.isascii() and text.isdigit() and len(text) <= _MAX_DIGITS:
            return int(text)
    return 0


def _usd_of(value: AnyValue | None) -> float | None:
    """A reported cost: a finite, non-negative number; None sends the caller to the prices."""
    if value is None:
        return None
    kind = value.WhichOneof("value")
    if kind == "double_value":
        usd = value.double_value
    elif kind == "int_value":
        usd = float(value.int_value)
    else:
        return None
    return usd if math.isfinite(usd) and usd >= 0 else None


def _scalar_of(value: AnyValue) -> str | int | float | bool | None:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return value.double_value
    if kind == "bool_value":
        return value.bool_value
    return None


def _dimension_of(value: AnyValue | None, fallback: str) -> str:
    """A span's dimension value; its resource's when the span has no scalar value for it."""
    if value is None:
        return fallback
    scalar = _scalar_of(value)
    return fallback if scalar is None else str(scalar)


def resource_values(
    attributes: Any, dimension_names: tuple[str, ...]
) -> tuple[str | None, str | None, dict[str, str]]:
    """``service.name``, the OpenInference project and the dimension values of a resource."""
    service_name = project = None
    dimensions: dict[str, str] = {}
    kv: KeyValue
    for kv in attributes:
        key = kv.key
        is_string = kv.value.WhichOneof("value") == "string_value"
        if key == semconv.SERVICE_NAME and is_string:
            service_name = kv.value.string_value
        elif key == semconv.PROJECT_NAME and is_string:
            project = kv.value.string_value
        if key in dimension_names:
            scalar = _scalar_of(kv.value)
            if scalar is not None:
                dimensions[key] = str(scalar)
    return service_name, project, dimensions
