"""Decoding OTLP trace exports (protobuf and OTLP/JSON) and the per-span rules.

What a user relies on: every encoding a producer may send decodes to the same spans; anything
else becomes a ``DecodeError`` or a rejected span with a stable reason, never another exception
that would stop the partition.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from functools import partial

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from spanbuilder import (
    T0_MS,
    otlp_json,
    payload_of,
    request,
    request_of,
    resource_spans,
    sid,
    span_pb,
    tid,
)

from processor.core import decoding
from processor.core.decoding import decode_request, decode_spans, extract_spans
from processor.core.pricing import OwnPrice, PriceTable
from processor.core.semconv import ExtractionConfig
from processor.core.spans import SpanRecord
from processor.errors import DecodeError, InvalidInput
from processor.loadgen import Scenario, TraceGenerator

CONFIG = ExtractionConfig()


def sample_request() -> ExportTraceServiceRequest:
    """Two resources, two spans each, a realistic mix of attribute types."""
    return request(
        resource_spans(
            [
                span_pb(
                    trace=7,
                    span=1,
                    duration_ms=1_500,
                    attrs={"agent.name": "planner", "openinference.span.kind": "AGENT"},
                ),
                span_pb(
                    trace=7,
                    span=2,
                    parent=1,
                    start_ms=T0_MS + 10,
                    attrs={
                        "openinference.span.kind": "LLM",
                        "llm.token_count.prompt": 120,
                        "llm.token_count.completion": 30,
                        "llm.token_count.total": 150,
                        "llm.cost.total": 0.0025,
                        "input.value": "plan a trip " * 50,
                        "tags": ["a", "b"],
                        "flag": True,
                    },
                    error=True,
                ),
            ],
            resource={"service.name": "travel", "openinference.project.name": "proj"},
        ),
        resource_spans(
            [
                span_pb(
                    trace=8,
                    span=3,
                    start_ns=T0_MS * 1_000_000 + 1,
                    end_ns=T0_MS * 1_000_000 + 999_999,
                    attrs={"gen_ai.agent.name": "booker", "gen_ai.operation.name": "chat"},
                ),
                span_pb(trace=8, span=4, parent=3, attrs={"gen_ai.usage.input_tokens": 5}),
            ],
            resource={"service.name": "booking"},
        ),
    )


def spans_in(message: ExportTraceServiceRequest) -> list[Span]:
    return [span for rs in message.resource_spans for ss in rs.scope_spans for span in ss.spans]


FIELDS = (
    "trace_id",
    "span_id",
    "parent_span_id",
    "start_ns",
    "end_ns",
    "is_error",
    "own_agent",
    "is_llm",
    "tokens_prompt",
    "tokens_completion",
    "tokens_total",
    "cost_nanos",
    "service_name",
)


def record_fields(message: ExportTraceServiceRequest) -> list[dict[str, object]]:
    decoded = extract_spans(message, CONFIG)
    assert decoded.rejected == []
    return [
        {name: getattr(r, name) for name in FIELDS} | {"project": r.origin.project}
        for r in decoded.spans
    ]


def expected(
    trace: int, span: int, parent: int | None, start_ns: int, end_ns: int, **overrides: object
) -> dict[str, object]:
    fields: dict[str, object] = {
        "trace_id": tid(trace),
        "span_id": sid(span),
        "parent_span_id": b"" if parent is None else sid(parent),
        "start_ns": start_ns,
        "end_ns": end_ns,
        "is_error": False,
        "own_agent": None,
        "is_llm": False,
        "tokens_prompt": 0,
        "tokens_completion": 0,
        "tokens_total": 0,
        "cost_nanos": 0,
        "service_name": "travel",
        "project": "proj",
    }
    return fields | overrides


MS = 1_000_000
EXPECTED_FIELDS = [
    expected(7, 1, None, T0_MS * MS, (T0_MS + 1_500) * MS, own_agent="planner"),
    expected(
        7,
        2,
        1,
        (T0_MS + 10) * MS,
        (T0_MS + 110) * MS,
        is_error=True,
        is_llm=True,
        tokens_prompt=120,
        tokens_completion=30,
        tokens_total=150,
        cost_nanos=2_500_000,
    ),
    expected(
        8,
        3,
        None,
        T0_MS * MS + 1,
        T0_MS * MS + 999_999,
        own_agent="booker",
        is_llm=True,
        service_name="booking",
        project=None,
    ),
    expected(8, 4, 3, T0_MS * MS, (T0_MS + 100) * MS, service_name="booking", project=None),
]


# --- round trips ------------------------------------------------------------------------------


def test_protobuf_round_trip_gives_the_spans_that_were_sent() -> None:
    original = sample_request()
    decoded = decode_request(original.SerializeToString(), "application/x-protobuf")

    assert decoded == original
    assert record_fields(decoded) == EXPECTED_FIELDS
    # the record keeps the span itself, so Phoenix gets it unchanged
    records = extract_spans(decoded, CONFIG).spans
    assert [r.pb for r in records] == spans_in(original)
    assert records[0].origin.resource == original.resource_spans[0].resource


@pytest.mark.parametrize("encoding", ["protobuf", "json"])
def test_a_released_message_gives_its_spans_back_parsed_again(encoding: str) -> None:
    """A span waiting in a buffer keeps its message's payload, not the parsed message; the
    span Phoenix gets later is the one that arrived, with the rejected ones still counted in
    the positions."""
    original = sample_request()
    original.resource_spans[0].scope_spans[0].spans.add()  # no ids: rejected, keeps its place
    original.resource_spans[0].scope_spans[0].spans.append(span_pb(span=9, attrs={"k": "v"}))
    payload, content_type = (
        (original.SerializeToString(), "application/x-protobuf")
        if encoding == "protobuf"
        else (otlp_json(original), "application/json")
    )
    decoded = extract_spans(
        decode_request(payload, content_type), CONFIG, payload=payload, content_type=content_type
    )
    assert len(decoded.rejected) == 1
    held = [record.pb for record in decoded.spans]
    assert [record.pb for record in decoded.spans] == held  # the same objects while held
    assert all(a is b for a, b in zip(held, (r.pb for r in decoded.spans), strict=True))

    decoded.source.release()
    again = [record.pb for record in decoded.spans]
    assert again == [span for span in spans_in(original) if span.span_id]
    assert all(a is not b for a, b in zip(held, again, strict=True))  # parsed anew
    # hold() parses once for many spans: repeated reads give the same objects
    decoded.source.hold()
    assert all(
        a is b
        for a, b in zip([r.pb for r in decoded.spans], [r.pb for r in decoded.spans], strict=True)
    )
    # the origin is a copy: it does not keep the parsed request alive, and equals it
    assert decoded.spans[0].origin.resource == original.resource_spans[0].resource


def test_without_its_payload_a_message_keeps_its_parsed_spans() -> None:
    original = sample_request()
    decoded = extract_spans(original, CONFIG)
    held = [record.pb for record in decoded.spans]
    decoded.source.release()  # nothing to parse again from: a no-op
    assert all(a is b for a, b in zip(held, (r.pb for r in decoded.spans), strict=True))


@pytest.mark.parametrize(
    "content_type", [None, "application/json", "application/json; charset=utf-8"]
)
def test_otlp_json_round_trip_equals_the_protobuf_request(content_type: str | None) -> None:
    original = sample_request()
    payload = otlp_json(original)
    document = orjson.loads(payload)
    span = document["resourceSpans"][0]["scopeSpans"][0]["spans"][1]
    # the OTLP/JSON mapping, not protobuf's default one
    assert span["traceId"] == tid(7).hex()
    assert span["startTimeUnixNano"] == str((T0_MS + 10) * 10**6)
    assert span["status"]["code"] == Status.STATUS_CODE_ERROR

    decoded = decode_request(payload, content_type)

    assert decoded == original
    assert record_fields(decoded) == EXPECTED_FIELDS


def test_hand_written_otlp_json_as_in_the_specification() -> None:
    payload = b"""{
      "resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]},
        "scopeSpans": [{
          "scope": {"name": "manual"},
          "spans": [{
            "traceId": "5B8EFFF798038103D269B633813FC60C",
            "spanId": "EEE19B7EC3C1B174",
            "parentSpanId": "eee19b7ec3c1b173",
            "name": "llm call",
            "kind": 3,
            "startTimeUnixNano": "1544712660000000000",
            "endTimeUnixNano": 1544712661000000000,
            "attributes": [
              {"key": "openinference.span.kind", "value": {"stringValue": "LLM"}},
              {"key": "llm.token_count.prompt", "value": {"intValue": "42"}},
              {"key": "llm.token_count.completion", "value": {"intValue": 8}},
              {"key": "llm.cost.total", "value": {"doubleValue": 0.5}}
            ],
            "status": {"code": 2, "message": "boom"},
            "someFieldFromTheFuture": {"x": 1}
          }]
        }]
      }]
    }"""

    [record] = extract_spans(decode_request(payload), CONFIG).spans

    assert record.trace_id == bytes.fromhex("5b8efff798038103d269b633813fc60c")
    assert record.span_id == bytes.fromhex("eee19b7ec3c1b174")
    assert record.parent_span_id == bytes.fromhex("eee19b7ec3c1b173")
    assert (record.start_ns, record.end_ns) == (1544712660000000000, 1544712661000000000)
    assert record.pb.kind == Span.SPAN_KIND_CLIENT
    assert record.is_error
    assert (record.tokens_prompt, record.tokens_completion, record.tokens_total) == (42, 8, 50)
    assert record.cost_nanos == 500_000_000
    assert record.service_name == "svc"


@pytest.mark.parametrize("payload", [b'{"resourceSpans":[]}', b'  { "resourceSpans" : [ ] }\n'])
def test_an_explicitly_empty_json_request_is_valid_and_has_no_spans(payload: bytes) -> None:
    decoded = extract_spans(decode_request(payload), CONFIG)
    assert decoded.spans == [] and decoded.rejected == []


# --- encoding: from the content type, else sniffed ---------------------------------------------

PROTOBUF = payload_of([span_pb()])
JSON = otlp_json(request_of([span_pb()]))


@pytest.mark.parametrize(
    ("payload", "content_type", "reason"),
    [
        (PROTOBUF, None, None),
        (PROTOBUF, "application/x-protobuf", None),
        (PROTOBUF, "application/protobuf", None),
        (PROTOBUF, "Application/X-Protobuf; proto=ExportTraceServiceRequest", None),
        (JSON, None, None),
        (b"  \n" + JSON, None, None),
        (JSON, "application/json", None),
        (JSON, "APPLICATION/JSON;charset=UTF-8", None),
        # the header wins over sniffing: bytes that do not match it are an error
        (JSON, "application/x-protobuf", "invalid_protobuf"),
        (PROTOBUF, "application/json", "invalid_json"),
        (PROTOBUF, "text/plain", "unsupported_content_type"),
        (JSON, "application/grpc", "unsupported_content_type"),
    ],
)
def test_encoding_comes_from_the_content_type_else_from_the_bytes(
    payload: bytes, content_type: str | None, reason: str | None
) -> None:
    if reason is None:
        [record] = extract_spans(decode_request(payload, content_type), CONFIG).spans
        assert record.trace_id == tid(1)
        [record] = decode_spans(payload, content_type, CONFIG).spans
        assert record.trace_id == tid(1)
    else:
        for decode in (decode_request, partial(decode_spans, config=CONFIG)):
            with pytest.raises(DecodeError) as caught:
                decode(payload, content_type)
            assert caught.value.reason == reason
            assert caught.value.detail


# --- invalid messages --------------------------------------------------------------------------


def with_attribute_value(raw_value: bytes) -> bytes:
    """A serialised request whose one attribute string value is ``raw_value`` (any bytes)."""
    marker = b"MARKER-VALUE"
    payload = payload_of([span_pb(attrs={"k": marker.decode()})])
    assert len(raw_value) == len(marker)  # keeps every length prefix right
    return payload.replace(marker, raw_value)


@pytest.mark.parametrize(
    ("payload", "content_type", "reason", "detail_part"),
    [
        (b"", None, "empty_message", "no bytes"),
        (PROTOBUF[:-7], None, "invalid_protobuf", "parsing"),
        (PROTOBUF[:-7], "application/x-protobuf", "invalid_protobuf", "parsing"),
        (b"\x0a\xff\xff\xff\xff\x0f", None, "invalid_protobuf", "parsing"),
        # bytes that parse as unknown fields only: not a trace export
        (b"\x08\x96\x01", None, "not_otlp_traces", "resourceSpans"),
        (b"{not json", None, "invalid_json", ""),
        (b"{}", None, "not_otlp_traces", "resourceSpans"),
        (b"[1, 2]", None, "not_otlp_traces", "resourceSpans"),
        (b'{"data": [1]}', "application/json", "not_otlp_traces", "resourceSpans"),
        (b'{"resourceSpans": 5}', None, "not_otlp_traces", ""),
        (b'{"resourceSpans": [5]}', None, "not_otlp_traces", ""),
        (
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
            None,
            "not_otlp_traces",
            "traceId is not hex",
        ),
        (
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"startTimeUnixNano": "soon"}]}]}]}',
            None,
            "not_otlp_traces",
            "resourceSpans.scopeSpans.spans.startTimeUnixNano",
        ),
        (
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"endTimeUnixNano": -1}]}]}]}',
            None,
            "not_otlp_traces",
            "endTimeUnixNano",
        ),
    ],
)
def test_an_undecodable_message_raises_decode_error_with_a_readable_reason(
    payload: bytes, content_type: str | None, reason: str, detail_part: str
) -> None:
    for decode in (decode_request, partial(decode_spans, config=CONFIG)):
        with pytest.raises(DecodeError) as caught:
            decode(payload, content_type)

        assert caught.value.reason == reason
        assert detail_part in caught.value.detail
        assert str(caught.value).startswith(reason)
        assert isinstance(caught.value, InvalidInput)  # the worker dead-letters InvalidInput


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"MARKER-VALU\xff", id="invalid-byte"),
        pytest.param(b"MARKER-\xed\xa0\x80-V", id="surrogate"),
        pytest.param(b"MARKER-VAL\xe2\x82", id="truncated-sequence"),
    ],
)
def test_invalid_utf8_in_a_protobuf_string_is_a_decode_error(raw: bytes) -> None:
    # upb validates proto3 strings while parsing and refuses the whole message
    for decode in (decode_request, partial(decode_spans, config=CONFIG)):
        with pytest.raises(DecodeError) as caught:
            decode(with_attribute_value(raw), None)

        assert caught.value.reason == "invalid_protobuf"
        assert "UTF-8" in caught.value.detail


def test_invalid_utf8_in_a_span_name_is_a_decode_error() -> None:
    # the worker reads spans through slim_otlp, which must refuse what OTLP's classes refuse
    payload = payload_of([span_pb(name="name-XY")]).replace(b"name-XY", b"name-\xc3\x28")
    for decode in (decode_request, partial(decode_spans, config=CONFIG)):
        with pytest.raises(DecodeError) as caught:
            decode(payload, None)
        assert caught.value.reason == "invalid_protobuf"


def test_a_message_over_the_size_limit_is_refused_before_parsing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(decoding, "MAX_MESSAGE_BYTES", len(PROTOBUF) - 1)
    with pytest.raises(DecodeError) as caught:
        decode_request(PROTOBUF)
    assert caught.value.reason == "message_too_large"


@pytest.mark.parametrize(("count", "accepted"), [(3, True), (4, False)])
def test_spans_per_message_are_limited(count: int, accepted: bool) -> None:
    config = ExtractionConfig(max_spans_per_message=3)
    message = request(
        resource_spans([span_pb(span=1), span_pb(span=2)]),
        resource_spans([span_pb(span=n) for n in range(3, count + 1)]),
    )
    if accepted:
        assert len(extract_spans(message, config).spans) == count
    else:
        with pytest.raises(DecodeError) as caught:
            extract_spans(message, config)
        assert caught.value.reason == "too_many_spans"
        assert "4 spans" in caught.value.detail


# --- per-span rules ----------------------------------------------------------------------------

LIMIT = 64


@pytest.mark.parametrize(
    ("span", "reason"),
    [
        (span_pb(trace=b""), "missing_trace_id"),
        (span_pb(trace=bytes(16)), "missing_trace_id"),
        (span_pb(trace=b"\x01" * 8), "missing_trace_id"),
        (span_pb(span=b""), "missing_span_id"),
        (span_pb(span=bytes(8)), "missing_span_id"),
        (span_pb(span=b"\x01" * 16), "missing_span_id"),
        (span_pb(parent=b"\x01" * 4), "invalid_parent_span_id"),
        (span_pb(start_ns=2_000, end_ns=1_999), "end_before_start"),
        (span_pb(attrs={"input.value": "x" * (LIMIT + 1)}), "attribute_too_large"),
        # the limit is in bytes, not characters: 22 three-byte characters are 66 bytes
        (span_pb(attrs={"input.value": "€" * 22}), "attribute_too_large"),
        (span_pb(attrs={"blob": b"\x00" * (LIMIT + 1)}), "attribute_too_large"),
        (span_pb(attrs={"list": ["y" * 40, "z" * 40]}), "attribute_too_large"),
        # exactly at the limits: accepted
        (span_pb(attrs={"input.value": "x" * LIMIT}), None),
        (span_pb(attrs={"blob": b"\x00" * LIMIT}), None),
        (span_pb(start_ns=2_000, end_ns=2_000), None),
        (span_pb(start_ns=0, end_ns=0), None),
        (span_pb(trace=b"\x00" * 15 + b"\x01", span=b"\x00" * 7 + b"\x01"), None),
    ],
)
def test_a_span_that_breaks_a_rule_is_rejected_with_its_reason(
    span: Span, reason: str | None
) -> None:
    config = ExtractionConfig(max_attribute_value_bytes=LIMIT)
    good = span_pb(trace=99, span=99)
    message = request_of([good, span, good], resource={"service.name": "svc"})

    payload = message.SerializeToString()
    for decoded in (extract_spans(message, config), decode_spans(payload, None, config)):
        if reason is None:
            assert len(decoded.spans) == 3 and decoded.rejected == []
        else:
            # the rejected span keeps what the dead-letter topic needs; its neighbours go on
            [rejected] = decoded.rejected
            assert rejected.reason == reason
            assert rejected.detail
            assert rejected.pb == span
            assert rejected.origin.service_name == "svc"
            assert [r.span_id for r in decoded.spans] == [sid(99), sid(99)]


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({"openinference.span.kind": "LLM", "llm.token_count.prompt": 1 << 41}, "absurd_value"),
        ({"openinference.span.kind": "LLM", "llm.token_count.total": 1 << 62}, "absurd_value"),
        ({"openinference.span.kind": "LLM", "llm.cost.total": 2e6}, "absurd_value"),
        ({"openinference.span.kind": "LLM", "llm.cost.total": 1e300}, "absurd_value"),
        ({"openinference.span.kind": "LLM", "llm.token_count.prompt": 1 << 40}, None),
        ({"openinference.span.kind": "LLM", "llm.cost.total": 999_999.0}, None),
        # a CHAIN span's numbers are never counted, so they cannot be absurd
        ({"openinference.span.kind": "CHAIN", "llm.token_count.total": 1 << 62}, None),
    ],
)
def test_absurd_token_counts_and_costs_are_rejected(
    attrs: dict[str, object], reason: str | None
) -> None:
    # Partials are JSON with 64-bit integers: sums of such values would not encode, and the
    # partition would stop at every replay.
    decoded = extract_spans(request_of([span_pb(attrs=attrs)]), CONFIG)
    assert [r.reason for r in decoded.rejected] == ([reason] if reason else [])
    assert len(decoded.spans) == (0 if reason else 1)


def test_a_price_table_cost_that_overflows_is_rejected_not_a_crash() -> None:
    config = ExtractionConfig(
        prices=PriceTable({"m": OwnPrice(input=1e300, output=1e300)}, catalogue=False)
    )
    attrs = {
        "openinference.span.kind": "LLM",
        "llm.model_name": "m",
        "llm.token_count.prompt": 1 << 40,
        "llm.token_count.completion": 1 << 40,
    }
    decoded = extract_spans(request_of([span_pb(attrs=attrs)]), config)
    assert [r.reason for r in decoded.rejected] == ["absurd_value"]


def test_json_nested_too_deep_is_a_decode_error_that_names_the_cause() -> None:
    value: dict[str, object] = {"stringValue": "x"}
    for _ in range(120):
        value = {"kvlistValue": {"values": [{"key": "k", "value": value}]}}
    span = {"traceId": "01" * 16, "spanId": "02" * 8, "attributes": [{"key": "a", "value": value}]}
    payload = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}).encode()

    with pytest.raises(DecodeError) as caught:
        decode_request(payload)

    assert caught.value.reason == "not_otlp_traces"
    assert "too deep" in caught.value.detail
    assert len(caught.value.detail) < 400


def test_skipping_the_size_check_for_small_messages_changes_nothing() -> None:
    config = ExtractionConfig(max_attribute_value_bytes=LIMIT)
    small = payload_of([span_pb(attrs={"input.value": "x" * 10})])
    big = payload_of([span_pb(attrs={"input.value": "x" * (LIMIT + 1)})])
    for payload in (small, big):
        message = decode_request(payload)
        with_hint = extract_spans(message, config, payload_size=len(payload))
        without = extract_spans(message, config)
        assert [r.reason for r in with_hint.rejected] == [r.reason for r in without.rejected]
        assert len(with_hint.spans) == len(without.spans)
    assert [r.reason for r in extract_spans(decode_request(big), config).rejected] == [
        "attribute_too_large"
    ]


# --- nothing but DecodeError, whatever the bytes ------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_and_extract(payload: bytes, content_type: str | None = None) -> None:
    """What the worker does with a message; only ``DecodeError`` may escape."""
    try:
        message = decode_request(payload, content_type)
    except DecodeError as exc:
        assert exc.reason and exc.detail
        return
    decoded = extract_spans(message, ExtractionConfig(max_attribute_value_bytes=LIMIT))
    for rejected in decoded.rejected:
        assert rejected.reason


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_decode_error(payload: bytes) -> None:
    decode_and_extract(payload)


@FUZZ
@given(st.data())
def test_corrupted_protobuf_never_raises_anything_but_decode_error(data: st.DataObject) -> None:
    payload = bytearray(sample_request().SerializeToString())
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(payload) - 1))
        payload[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(payload)))
    decode_and_extract(bytes(payload[:cut]), "application/x-protobuf")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "traceId",
                    "spanId",
                    "spans",
                    "scopeSpans",
                    "attributes",
                    "key",
                    "value",
                    "intValue",
                    "stringValue",
                    "startTimeUnixNano",
                    "status",
                    "code",
                    "kind",
                    "x",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@FUZZ
@given(st.lists(json_values, max_size=3))
def test_arbitrary_json_never_raises_anything_but_decode_error(groups: list[object]) -> None:
    decode_and_extract(json.dumps({"resourceSpans": groups}).encode())


@FUZZ
@given(
    trace=st.binary(min_size=16, max_size=16),
    span=st.binary(min_size=8, max_size=8),
    start=st.integers(0, 2**64 - 1),
    duration=st.integers(0, 2**40),
    value=st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=30)),
)
def test_any_well_formed_span_is_either_a_record_or_rejected_never_an_exception(
    trace: bytes, span: bytes, start: int, duration: int, value: object
) -> None:
    end = min(start + duration, 2**64 - 1)
    attrs = {
        "openinference.span.kind": "LLM",
        "llm.token_count.prompt": value,
        "llm.token_count.total": value,
        "llm.cost.total": value,
        "agent.name": value,
    }
    message = request_of([span_pb(trace=trace, span=span, start_ns=start, end_ns=end, attrs=attrs)])
    payload = message.SerializeToString()
    for encoded, content_type in ((payload, None), (otlp_json(message), None)):
        decoded = extract_spans(decode_request(encoded, content_type), CONFIG)
        assert len(decoded.spans) + len(decoded.rejected) == 1
        for record in decoded.spans:
            assert record.tokens_prompt >= 0 and record.cost_nanos >= 0


def test_link_ids_in_otlp_json_are_hex_too() -> None:
    message = request_of([span_pb()])
    message.resource_spans[0].scope_spans[0].spans[0].links.add(trace_id=tid(5), span_id=sid(6))
    document = orjson.loads(otlp_json(message))
    link = document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["links"][0]
    link["traceId"] = base64.b64decode(link["traceId"]).hex()
    link["spanId"] = base64.b64decode(link["spanId"]).hex()

    decoded = decode_request(orjson.dumps(document))

    assert decoded == message


def test_the_worker_reading_gives_the_records_the_otlp_classes_give() -> None:
    """``decode_spans`` reads spans through slim_otlp's map of attributes; its records, and
    the spans it hands to Phoenix, are those of ``extract_spans(decode_request(...))``."""
    scenario = Scenario(agents=4, trace_size=30, seed=3, error_rate=0.2)
    config = ExtractionConfig(
        dimension_attributes=("session.id", "service.name"),
        prices=PriceTable(),
    )
    compared = 0
    for trace in TraceGenerator(scenario, start_ms=T0_MS, rate=50.0).generate(40):
        payload = trace.payload
        ours = decode_spans(payload, None, config)
        theirs = extract_spans(decode_request(payload), config)
        assert [_fields(r) for r in ours.spans] == [_fields(r) for r in theirs.spans]
        assert [r.pb for r in ours.spans] == [r.pb for r in theirs.spans]
        assert ours.rejected == theirs.rejected == []
        compared += len(ours.spans)
    assert compared > 500


def _fields(record: SpanRecord) -> tuple[object, ...]:
    """A record's fields, its origin's by value (origins compare by identity)."""
    values = {field.name: getattr(record, field.name) for field in dataclasses.fields(record)}
    del values["source"]
    origin = values.pop("origin")
    values["origin"] = tuple(getattr(origin, f.name) for f in dataclasses.fields(origin))
    return tuple(values.items())


def test_an_oversized_value_hidden_under_a_repeated_key_is_still_refused() -> None:
    """The worker reads attributes as a map, which keeps a repeated key's last value only;
    the size limit looks at the list as it came, so an earlier oversized value is caught."""
    config = ExtractionConfig(max_attribute_value_bytes=LIMIT)
    span = span_pb(span=2, attrs={"input.value": "x" * (LIMIT + 1)})
    span.attributes.append(KeyValue(key="input.value", value=AnyValue(string_value="small")))
    payload = request_of([span_pb(span=1), span]).SerializeToString()
    for decoded in (
        extract_spans(decode_request(payload), config),
        decode_spans(payload, None, config),
    ):
        assert [r.reason for r in decoded.rejected] == ["attribute_too_large"]
        assert [r.span_id for r in decoded.spans] == [sid(1)]
