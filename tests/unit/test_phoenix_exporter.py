"""The Phoenix exporter's classification of answers, its request format and the backoff rule.

The network is an ``httpx.MockTransport``: these tests pin our policy and our request, not
Phoenix's behaviour (that is what tests/integration/test_phoenix_forwarding.py is for).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
from collections.abc import Callable

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from pydantic import SecretStr

from processor.core.spans import SpanOrigin
from processor.sinks.phoenix import (
    BODY_EXCERPT_CHARS,
    MAX_RETRY_AFTER_S,
    ExportOutcome,
    ExportResult,
    PhoenixExporter,
    RetryPolicy,
    StoredCheck,
    outcome_of,
    retry_after_s,
)

URL = "http://phoenix.test/v1/traces"
KEY = "sk-very-secret-0123456789"


def _items(count: int, service: str = "svc", first_id: int = 1) -> list[tuple[SpanOrigin, Span]]:
    origin = SpanOrigin(
        resource=Resource(
            attributes=[KeyValue(key="service.name", value=AnyValue(string_value=service))]
        ),
        scope=ExportTraceServiceRequest().resource_spans.add().scope_spans.add().scope,
        resource_schema_url="",
        scope_schema_url="",
        service_name=service,
        project=None,
    )
    return [
        (origin, Span(trace_id=b"\x01" * 16, span_id=(i + first_id).to_bytes(8, "big")))
        for i in range(count)
    ]


def _exporter(
    handler: Callable[[httpx.Request], httpx.Response], api_key: SecretStr | None = None
) -> PhoenixExporter:
    return PhoenixExporter(traces_url=URL, api_key=api_key, transport=httpx.MockTransport(handler))


def _send(exporter: PhoenixExporter, body: bytes, project: str | None = None) -> ExportResult:
    async def go() -> ExportResult:
        try:
            return await exporter.send(body, project=project)
        finally:
            await exporter.shutdown()

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, ExportOutcome.ACCEPTED),
        (204, ExportOutcome.ACCEPTED),
        (401, ExportOutcome.UNAUTHORIZED),
        (403, ExportOutcome.UNAUTHORIZED),
        (408, ExportOutcome.RETRY),
        (429, ExportOutcome.RETRY),
        (500, ExportOutcome.RETRY),
        (502, ExportOutcome.RETRY),
        (503, ExportOutcome.RETRY),  # Phoenix: span queue full
        (504, ExportOutcome.RETRY),
        (507, ExportOutcome.RETRY),  # Phoenix: database storage full (locked)
        (400, ExportOutcome.REJECTED),
        (404, ExportOutcome.REJECTED),
        (413, ExportOutcome.REJECTED),
        (415, ExportOutcome.REJECTED),
        (422, ExportOutcome.REJECTED),
    ],
)
def test_each_status_is_handled_as_the_issue_says(status: int, outcome: ExportOutcome) -> None:
    assert outcome_of(status) is outcome


def test_a_batch_is_one_gzip_protobuf_post_with_key_and_project() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    items = _items(3)
    exporter = _exporter(handler, api_key=SecretStr(KEY))
    result = _send(exporter, PhoenixExporter.encode(items), project="checkout")

    assert result.ok
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == URL
    assert request.headers["content-type"] == "application/x-protobuf"
    assert request.headers["content-encoding"] == "gzip"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["x-project-name"] == "checkout"
    sent = ExportTraceServiceRequest.FromString(gzip.decompress(request.content))
    spans = [s for rs in sent.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert [s.span_id for s in spans] == [pb.span_id for _, pb in items]
    assert sent.resource_spans[0].resource == items[0][0].resource


@pytest.mark.parametrize("key", [None, SecretStr("")])
def test_without_a_key_no_authorization_header_is_sent(key: SecretStr | None) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    _send(_exporter(handler, api_key=key), PhoenixExporter.encode(_items(1)))
    assert "authorization" not in seen[0].headers
    assert "x-project-name" not in seen[0].headers


def test_the_key_is_not_in_the_repr() -> None:
    exporter = PhoenixExporter(traces_url=URL, api_key=SecretStr(KEY))
    assert KEY not in repr(exporter)
    assert exporter.has_api_key
    asyncio.run(exporter.shutdown())


def test_a_permanent_rejection_carries_the_status_and_an_excerpt_of_the_body() -> None:
    body = "Request body is invalid ExportTraceServiceRequest " + "x" * 5000

    result = _send(
        _exporter(lambda request: httpx.Response(422, text=body)),
        PhoenixExporter.encode(_items(1)),
    )

    assert result.outcome is ExportOutcome.REJECTED
    assert result.status == 422
    assert result.detail.startswith("Request body is invalid")
    assert len(result.detail) <= BODY_EXCERPT_CHARS + 3


def test_a_connection_error_is_retryable_and_says_what_happened() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    result = _send(_exporter(handler), PhoenixExporter.encode(_items(1)))

    assert result.outcome is ExportOutcome.RETRY
    assert result.status is None
    assert "ConnectError" in result.detail
    assert "refused" in result.detail


def test_a_503_passes_on_retry_after() -> None:
    result = _send(
        _exporter(lambda request: httpx.Response(503, headers={"retry-after": "7"})),
        PhoenixExporter.encode(_items(1)),
    )
    assert result.outcome is ExportOutcome.RETRY
    assert result.retry_after_s == 7.0


NOW_S = 1_700_000_000.0  # 2023-11-14T22:13:20Z


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("0", 0.0),
        ("12", 12.0),
        (" 3 ", 3.0),
        ("Tue, 14 Nov 2023 22:13:50 GMT", 30.0),
        ("Tue, 14 Nov 2023 22:13:00 GMT", 0.0),  # in the past: go now
        ("soon", None),
        ("-5", None),
        ("1.5", None),  # RFC 9110: delta-seconds is an integer
    ],
)
def test_retry_after_is_read_in_both_forms(value: str | None, expected: float | None) -> None:
    assert retry_after_s(value, now_s=NOW_S) == expected


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_s=0.5, max_s=8.0)
    rng = random.Random(1)
    for attempt, ceiling in [
        (1, 0.5),
        (2, 1.0),
        (3, 2.0),
        (4, 4.0),
        (5, 8.0),
        (6, 8.0),
        (500, 8.0),
    ]:
        delays = [policy.delay_s(attempt, rng=rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, min(delays))
        assert max(delays) - min(delays) > ceiling / 4, "no jitter"


def test_retry_after_is_honoured_and_capped() -> None:
    policy = RetryPolicy(initial_s=0.5, max_s=8.0)
    rng = random.Random(2)
    assert 30.0 <= policy.delay_s(1, 30.0, rng=rng) <= 30.5
    assert policy.delay_s(1, 1e9, rng=rng) <= MAX_RETRY_AFTER_S + 0.5


@pytest.mark.parametrize(
    "kwargs",
    [{"initial_s": 0.0}, {"initial_s": 2.0, "max_s": 1.0}, {"multiplier": 0.5}],
)
def test_a_nonsense_policy_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def _ask(exporter: PhoenixExporter, span_ids: list[str]) -> StoredCheck:
    async def go() -> StoredCheck:
        try:
            return await exporter.stored_span_ids(span_ids)
        finally:
            await exporter.shutdown()

    return asyncio.run(go())


def test_stored_span_ids_asks_graphql_for_every_id_in_one_request() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        variables = json.loads(request.content)["variables"]
        data = {
            name: ({"id": "x"} if v == "00000000000000aa" else None)
            for name, v in variables.items()
        }
        return httpx.Response(200, json={"data": data})

    check = _ask(
        _exporter(handler, api_key=SecretStr(KEY)), ["00000000000000aa", "00000000000000bb"]
    )

    assert check.result.ok
    assert check.found == {"00000000000000aa"}
    (request,) = seen
    assert str(request.url) == "http://phoenix.test/graphql"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert "content-encoding" not in request.headers
    assert "getSpanByOtelId" in json.loads(request.content)["query"]


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (httpx.Response(200, json={"errors": [{"message": "Cannot query field"}]}), "rejected"),
        (httpx.Response(404, text="Not Found"), "rejected"),
        (httpx.Response(200, text="<html>not json</html>"), "rejected"),
        (httpx.Response(401, text="Invalid token"), "unauthorized"),
        (httpx.Response(502), "retry"),
    ],
)
def test_a_phoenix_that_cannot_answer_which_spans_it_wrote_says_so(
    answer: httpx.Response, outcome: str
) -> None:
    check = _ask(_exporter(lambda request: answer), ["00000000000000aa"])
    assert check.result.outcome.value == outcome
    assert not check.found


def test_the_first_and_last_span_queued_are_those_of_the_request_order() -> None:
    first, second = _items(2, service="a"), _items(2, service="b", first_id=10)
    # Interleaved origins: the request groups them, so the last queued is second[-1] here.
    items = [first[0], second[0], first[1], second[1]]
    encoded = asyncio.run(PhoenixExporter.encode_batch(items))
    request = ExportTraceServiceRequest.FromString(gzip.decompress(encoded.body))
    last = request.resource_spans[-1].scope_spans[-1].spans[-1]
    assert encoded.last_span_id == last.span_id.hex() == second[1][1].span_id.hex()
    assert encoded.first_span_id == first[0][1].span_id.hex()
