"""What the decoder pulls out of attributes: own agent, LLM tokens, cost, errors, dimensions.

OpenInference and OpenTelemetry GenAI names both count; tokens count on LLM spans only, so a
chain span repeating its children's totals adds nothing.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from spanbuilder import request, request_of, resource_spans, span_pb

from processor.core.decoding import extract_spans
from processor.core.pricing import OwnPrice, PriceTable
from processor.core.semconv import ExtractionConfig
from processor.core.spans import SpanRecord

PRICES = {
    "gpt-4o": OwnPrice(input=2.5, output=10.0),
    "small": OwnPrice(input=0.1, output=0.4),
}
CONFIG = ExtractionConfig(prices=PriceTable(PRICES, catalogue=False))
LLM = {"openinference.span.kind": "LLM"}
CHAT = {"gen_ai.operation.name": "chat"}


def extract(
    attrs: dict[str, Any],
    config: ExtractionConfig = CONFIG,
    *,
    resource: dict[str, Any] | None = None,
    error: bool = False,
) -> SpanRecord:
    decoded = extract_spans(request_of([span_pb(attrs=attrs, error=error)], resource), config)
    assert decoded.rejected == []
    [record] = decoded.spans
    return record


@pytest.mark.parametrize(
    ("attrs", "is_llm", "tokens"),
    [
        (
            {
                **LLM,
                "llm.token_count.prompt": 100,
                "llm.token_count.completion": 20,
                "llm.token_count.total": 120,
            },
            True,
            (100, 20, 120),
        ),
        # no total: prompt + completion
        (
            {**LLM, "llm.token_count.prompt": 100, "llm.token_count.completion": 20},
            True,
            (100, 20, 120),
        ),
        ({**LLM, "llm.token_count.total": 7}, True, (0, 0, 7)),
        # OpenTelemetry GenAI names, on a model-call operation
        (
            {**CHAT, "gen_ai.usage.input_tokens": 11, "gen_ai.usage.output_tokens": 4},
            True,
            (11, 4, 15),
        ),
        (
            {"gen_ai.operation.name": "text_completion", "gen_ai.usage.input_tokens": 3},
            True,
            (3, 0, 3),
        ),
        (
            {"gen_ai.operation.name": "generate_content", "gen_ai.usage.output_tokens": 2},
            True,
            (0, 2, 2),
        ),
        # OpenInference wins when both are there (same tokens, never added twice)
        ({**LLM, "llm.token_count.prompt": 10, "gen_ai.usage.input_tokens": 10}, True, (10, 0, 10)),
        # a chain or agent span repeating its children's totals contributes nothing
        (
            {
                "openinference.span.kind": "CHAIN",
                "llm.token_count.prompt": 100,
                "llm.token_count.total": 120,
            },
            False,
            (0, 0, 0),
        ),
        ({"openinference.span.kind": "AGENT", "llm.token_count.total": 500}, False, (0, 0, 0)),
        (
            {"gen_ai.operation.name": "invoke_agent", "gen_ai.usage.input_tokens": 50},
            False,
            (0, 0, 0),
        ),
        (
            {"gen_ai.operation.name": "embeddings", "gen_ai.usage.input_tokens": 50},
            False,
            (0, 0, 0),
        ),
        ({"llm.token_count.total": 500}, False, (0, 0, 0)),
        ({"openinference.span.kind": "llm-ish", "llm.token_count.total": 5}, False, (0, 0, 0)),
        # producers that send numbers in other types
        (
            {**LLM, "llm.token_count.prompt": 12.0, "llm.token_count.completion": "8"},
            True,
            (12, 8, 20),
        ),
        ({**LLM, "llm.token_count.prompt": " 12 "}, True, (12, 0, 12)),
        ({**LLM, "llm.token_count.prompt": -5, "llm.token_count.completion": 3}, True, (0, 3, 3)),
        # nonsense counts as nothing, and never crashes the partition
        ({**LLM, "llm.token_count.prompt": math.nan}, True, (0, 0, 0)),
        ({**LLM, "llm.token_count.prompt": math.inf}, True, (0, 0, 0)),
        ({**LLM, "llm.token_count.prompt": "²"}, True, (0, 0, 0)),
        ({**LLM, "llm.token_count.prompt": "9" * 5000}, True, (0, 0, 0)),
        ({**LLM, "llm.token_count.prompt": "12k"}, True, (0, 0, 0)),
        ({**LLM, "llm.token_count.prompt": True}, True, (0, 0, 0)),
        ({**LLM, "llm.token_count.prompt": [1, 2]}, True, (0, 0, 0)),
    ],
)
def test_tokens_count_on_llm_spans_only(
    attrs: dict[str, Any], is_llm: bool, tokens: tuple[int, int, int]
) -> None:
    record = extract(attrs)
    assert record.is_llm is is_llm
    assert (record.tokens_prompt, record.tokens_completion, record.tokens_total) == tokens


TOKENS = {"llm.token_count.prompt": 1_000, "llm.token_count.completion": 100}
# gpt-4o: 1000 * 2.5 / 1e6 + 100 * 10 / 1e6 = 0.0035 USD
GPT4O_NANOS = 3_500_000


@pytest.mark.parametrize(
    ("attrs", "cost_nanos"),
    [
        ({**LLM, "llm.cost.total": 0.0123}, 12_300_000),
        ({**LLM, "llm.cost.total": 2}, 2_000_000_000),
        # a reported cost wins over the price table, even zero
        ({**LLM, **TOKENS, "llm.model_name": "gpt-4o", "llm.cost.total": 0.5}, 500_000_000),
        ({**LLM, **TOKENS, "llm.model_name": "gpt-4o", "llm.cost.total": 0.0}, 0),
        # else the price table, by model
        ({**LLM, **TOKENS, "llm.model_name": "gpt-4o"}, GPT4O_NANOS),
        (
            {
                **CHAT,
                "gen_ai.usage.input_tokens": 1_000,
                "gen_ai.usage.output_tokens": 100,
                "gen_ai.request.model": "gpt-4o",
            },
            GPT4O_NANOS,
        ),
        # the model that answered wins over the one asked for
        (
            {**LLM, **TOKENS, "gen_ai.request.model": "small", "gen_ai.response.model": "gpt-4o"},
            GPT4O_NANOS,
        ),
        ({**LLM, **TOKENS, "llm.model_name": "unpriced"}, 0),
        ({**LLM, **TOKENS}, 0),
        # a cost that is no cost sends us to the price table
        ({**LLM, **TOKENS, "llm.model_name": "gpt-4o", "llm.cost.total": -1.0}, GPT4O_NANOS),
        ({**LLM, **TOKENS, "llm.model_name": "gpt-4o", "llm.cost.total": math.nan}, GPT4O_NANOS),
        ({**LLM, **TOKENS, "llm.model_name": "gpt-4o", "llm.cost.total": math.inf}, GPT4O_NANOS),
        ({**LLM, **TOKENS, "llm.model_name": "gpt-4o", "llm.cost.total": "0.1"}, GPT4O_NANOS),
        # cost belongs to LLM spans, like tokens
        ({"openinference.span.kind": "CHAIN", "llm.cost.total": 0.5}, 0),
        ({"openinference.span.kind": "CHAIN", **TOKENS, "llm.model_name": "gpt-4o"}, 0),
    ],
)
def test_cost_comes_from_llm_cost_total_else_the_price_table(
    attrs: dict[str, Any], cost_nanos: int
) -> None:
    assert extract(attrs).cost_nanos == cost_nanos


@pytest.mark.parametrize(("error", "expected"), [(True, True), (False, False)])
def test_errors_come_from_the_status_code(error: bool, expected: bool) -> None:
    assert extract({}, error=error).is_error is expected


def test_a_status_message_without_error_code_is_no_error() -> None:
    span = span_pb()
    span.status.message = "something odd"
    span.status.code = span.status.STATUS_CODE_OK
    [record] = extract_spans(request_of([span]), CONFIG).spans
    assert not record.is_error


@pytest.mark.parametrize(
    ("attrs", "config", "own_agent"),
    [
        ({"agent.name": "planner"}, CONFIG, "planner"),
        ({"gen_ai.agent.name": "booker"}, CONFIG, "booker"),
        ({"agent.name": "planner", "gen_ai.agent.name": "booker"}, CONFIG, "planner"),
        ({"agent.name": "", "gen_ai.agent.name": "booker"}, CONFIG, "booker"),
        ({"agent.name": 42}, CONFIG, None),
        ({}, CONFIG, None),
        # the attribute names are configurable
        (
            {"agent.name": "planner", "my.agent": "mine"},
            ExtractionConfig(agent_attributes=("my.agent",)),
            "mine",
        ),
        ({"agent.name": "planner"}, ExtractionConfig(agent_attributes=("my.agent",)), None),
        ({"b": "second"}, ExtractionConfig(agent_attributes=("a", "b")), "second"),
    ],
)
def test_own_agent_comes_from_the_configured_attributes_in_order(
    attrs: dict[str, Any], config: ExtractionConfig, own_agent: str | None
) -> None:
    assert extract(attrs, config).own_agent == own_agent


def test_the_resource_service_name_travels_with_the_record() -> None:
    message = request(
        resource_spans([span_pb(span=1)], {"service.name": "a", "openinference.project.name": "p"}),
        resource_spans([span_pb(span=2)], {"service.name": 7}),
        resource_spans([span_pb(span=3)]),
    )
    records = extract_spans(message, CONFIG).spans
    assert [(r.service_name, r.origin.project) for r in records] == [
        ("a", "p"),
        (None, None),
        (None, None),
    ]


DIMENSIONS = ExtractionConfig(dimension_attributes=("env", "tenant"))


@pytest.mark.parametrize(
    ("attrs", "resource", "dimensions"),
    [
        ({"env": "prod", "tenant": "acme"}, {}, ("prod", "acme")),
        # from the resource when the span has none
        ({"tenant": "acme"}, {"env": "staging"}, ("staging", "acme")),
        # the span's own value wins
        ({"env": "prod"}, {"env": "staging"}, ("prod", "")),
        ({}, {}, ("", "")),
        ({"env": 3, "tenant": True}, {}, ("3", "True")),
        ({}, {"env": 3}, ("3", "")),
        # a value that is no scalar does not hide the resource's
        ({"env": ["a", "b"]}, {"env": "staging"}, ("staging", "")),
    ],
)
def test_dimensions_come_from_span_else_resource_attributes(
    attrs: dict[str, Any], resource: dict[str, Any], dimensions: tuple[str, ...]
) -> None:
    assert extract(attrs, DIMENSIONS, resource=resource).dimensions == dimensions


def test_every_config_reads_its_own_dimension_attributes() -> None:
    # Regression: the set of wanted attributes was cached by id(config); a config built where a
    # collected one had lived got the old one's attributes and lost its dimensions.
    for n in range(20):
        config = ExtractionConfig(dimension_attributes=(f"dim{n}",))
        assert extract({f"dim{n}": "v"}, config).dimensions == ("v",)
        del config  # CPython frees it now, and may build the next one at the same address


@pytest.mark.parametrize(
    "build",
    [
        lambda: ExtractionConfig(agent_attributes=()),
        lambda: ExtractionConfig(max_spans_per_message=0),
        lambda: ExtractionConfig(max_attribute_value_bytes=0),
        lambda: OwnPrice(input=-1.0, output=1.0),
        lambda: OwnPrice(input=1.0, output=math.inf),
        lambda: OwnPrice(input=math.nan, output=1.0),
        lambda: OwnPrice(input=1.0, output=1.0, cache_read=-0.1),
    ],
)
def test_bad_configuration_is_refused_when_built(build: Any) -> None:
    with pytest.raises(ValueError, match="must"):
        build()


def test_an_attribute_sent_twice_counts_with_its_last_value() -> None:
    """OTLP allows a key twice in a span's list; like readers that build a map from it, the
    last value wins (and only once): the same for a span read through slim_otlp's map."""
    span = span_pb(attrs={**LLM, "llm.token_count.prompt": 1})
    span.attributes.append(KeyValue(key="llm.token_count.prompt", value=AnyValue(int_value=500)))
    span.attributes.append(KeyValue(key="agent.name"))  # no value at all: not an agent
    span.attributes.append(KeyValue(key="agent.name", value=AnyValue(string_value="planner")))
    [record] = extract_spans(request_of([span]), CONFIG).spans
    assert (record.tokens_prompt, record.tokens_total) == (500, 500)
    assert record.own_agent == "planner"
    assert record.pb == span  # what goes to Phoenix keeps the list as it came
