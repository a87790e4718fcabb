"""Prices of LLM calls: genai-prices' table through its coefficients, the user's own table,
and what the decoder makes of token kinds, reported and estimated costs, and the model."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price
from hypothesis import given, settings
from hypothesis import strategies as st
from spanbuilder import request_of, span_pb

from processor.core.decoding import extract_spans
from processor.core.pricing import OwnPrice, PriceTable, load_own_prices
from processor.core.semconv import ExtractionConfig

# 2026-01-01: before the date from which Anthropic's 4.6 models dropped their long-context tier.
JAN_2026_MS = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)
MODELS = [
    ("gpt-4o-mini", "openai"),
    ("gpt-4o-2024-08-06", "openai"),
    ("claude-sonnet-4-20250514", "anthropic"),
    ("claude-sonnet-4-6", "anthropic"),  # tiered: a prompt above 200k tokens costs more
    ("claude-3-5-haiku-20241022", None),
]


def _reference_nanos(model: str, provider: str | None, at_ms: int, **usage: int) -> int:
    """genai-prices' own price of one call, in 1e-9 USD rounded half up."""
    price = calc_price(
        GenaiUsage(**usage),
        model,
        provider_id=provider,
        genai_request_timestamp=datetime.fromtimestamp(at_ms / 1000, tz=UTC),
    ).total_price
    return int((Decimal(price) * 10**9 + Decimal("0.5")).to_integral_value(rounding="ROUND_FLOOR"))


@settings(max_examples=150, deadline=None)
@given(
    model=st.sampled_from(MODELS),
    prompt=st.integers(0, 400_000),
    completion=st.integers(0, 50_000),
    cached_share=st.floats(0, 1),
    written_share=st.floats(0, 1),
    minutes=st.integers(0, 60 * 24 * 400),
)
def test_the_table_prices_every_call_as_genai_prices_does(
    model: tuple[str, str | None],
    prompt: int,
    completion: int,
    cached_share: float,
    written_share: float,
    minutes: int,
) -> None:
    name, provider = model
    cache_read = int(prompt * cached_share)
    cache_write = int((prompt - cache_read) * written_share)
    at_ms = JAN_2026_MS + minutes * 60_000
    pricing = PriceTable().pricing(name, provider, at_ms)
    assert pricing is not None
    want = _reference_nanos(
        name,
        provider,
        at_ms - at_ms % 60_000,
        input_tokens=prompt,
        output_tokens=completion,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
    )
    assert pricing.cost_nanos(prompt, completion, cache_read, cache_write) == want


def test_a_long_prompt_costs_the_higher_tier_where_the_table_has_one() -> None:
    pricing = PriceTable().pricing("claude-sonnet-4-6", "anthropic", JAN_2026_MS)
    assert pricing is not None
    short = pricing.cost_nanos(200_000, 0)
    long = pricing.cost_nanos(200_001, 0)
    assert short == 600_000_000  # $3 per million
    assert long == 1_200_006_000  # $6 per million, on the whole prompt


def test_a_cache_read_costs_less_than_a_fresh_prompt_token() -> None:
    pricing = PriceTable().pricing("gpt-4o-mini", "openai", JAN_2026_MS)
    assert pricing is not None
    assert pricing.cost_nanos(1_000_000, 0) == 150_000_000
    assert pricing.cost_nanos(1_000_000, 0, cache_read=1_000_000) == 75_000_000


def test_unknown_models_and_providers() -> None:
    table = PriceTable()
    assert table.pricing("in-house-llm-v2", "vllm", JAN_2026_MS) is None
    # A provider name the table spells otherwise, or not at all, still finds the model.
    assert table.pricing("gpt-4o", "az.ai.openai", JAN_2026_MS) is not None
    assert table.pricing("gpt-4o", "some-gateway", JAN_2026_MS) is not None
    assert table.model_key("gpt-4o-mini-2024-07-18", "openai") == "gpt-4o-mini"
    assert table.model_key("In-House-LLM", None) == "in-house-llm"
    assert PriceTable(catalogue=False).pricing("gpt-4o", "openai", JAN_2026_MS) is None


def test_the_own_table_wins_and_prices_cache_reads_as_input_unless_told() -> None:
    own = {
        "gpt-4o-mini": OwnPrice(input=2.0, output=8.0),
        "Team-Model": OwnPrice(input=1.0, output=1.0, cache_read=0.25, cache_write=1.5),
    }
    table = PriceTable(own)
    mini = table.pricing("gpt-4o-mini", "openai", JAN_2026_MS)
    assert mini is not None
    assert mini.cost_nanos(1_000, 100, cache_read=500) == 2_800_000
    team = table.pricing("team-model", None, JAN_2026_MS)
    assert team is not None
    # 400 fresh ($0.0004) + 400 read at a quarter (0.0001) + 200 written at 1.5 (0.0003),
    # and 10 output tokens (0.00001)
    assert team.cost_nanos(1_000, 10, cache_read=400, cache_write=200) == 810_000


def test_the_own_table_file(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"m": {"input": 1, "output": 2, "cache_read": 0.1}}))
    assert load_own_prices(path) == {"m": OwnPrice(input=1.0, output=2.0, cache_read=0.1)}
    toml = tmp_path / "prices.toml"
    toml.write_text('[models."m"]\ninput = 1.5\noutput = 3\n')
    assert load_own_prices(toml) == {"m": OwnPrice(input=1.5, output=3.0)}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("[]", "must map model names"),
        ('{"m": 3}', "must be a table of rates"),
        ('{"m": {"input": 1}}', "needs output"),
        ('{"m": {"input": 1, "output": -2}}', "output must be a number >= 0"),
        ('{"m": {"input": 1, "output": 2, "cached": 1}}', "has cached"),
    ],
)
def test_a_bad_own_table_says_what_to_fix(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "prices.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_own_prices(path)


LLM = {"openinference.span.kind": "LLM"}


def _record(attrs: dict[str, Any], config: ExtractionConfig) -> Any:
    [record] = extract_spans(request_of([span_pb(attrs=attrs)]), config).spans
    return record


@pytest.mark.parametrize(
    "attrs",
    [
        {
            **LLM,
            "llm.token_count.prompt": 1_000,
            "llm.token_count.completion": 300,
            "llm.token_count.prompt_details.cache_read": 600,
            "llm.token_count.prompt_details.cache_write": 100,
            "llm.token_count.completion_details.reasoning": 200,
        },
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.usage.input_tokens": 1_000,
            "gen_ai.usage.output_tokens": 300,
            "gen_ai.usage.cache_read.input_tokens": 600,
            "gen_ai.usage.cache_creation.input_tokens": 100,
            "gen_ai.usage.reasoning.output_tokens": 200,
        },
        {  # the names older GenAI instrumentations write
            "gen_ai.operation.name": "chat",
            "gen_ai.usage.input_tokens": 1_000,
            "gen_ai.usage.output_tokens": 300,
            "gen_ai.usage.cache_read_input_tokens": 600,
            "gen_ai.usage.cache_creation_input_tokens": 100,
            "gen_ai.usage.reasoning_tokens": 200,
        },
    ],
)
def test_token_kinds_of_both_conventions(attrs: dict[str, Any]) -> None:
    record = _record(attrs, ExtractionConfig())
    assert (record.tokens_prompt, record.tokens_completion) == (1_000, 300)
    assert (record.tokens_cache_read, record.tokens_cache_write) == (600, 100)
    assert record.tokens_reasoning == 200


def test_token_kinds_count_on_llm_spans_only() -> None:
    chain = {"openinference.span.kind": "CHAIN", "llm.token_count.prompt_details.cache_read": 9}
    assert _record(chain, ExtractionConfig()).tokens_cache_read == 0


TOKENS = {**LLM, "llm.token_count.prompt": 1_000_000, "llm.token_count.completion": 0}


@pytest.mark.parametrize(
    ("attrs", "cost", "estimated", "unpriced"),
    [
        # reported: never replaced by the table
        (
            {**TOKENS, "llm.model_name": "gpt-4o-mini", "llm.cost.total": 9.5},
            9_500_000_000,
            0,
            False,
        ),
        # priced from the table, the model under each convention's names
        ({**TOKENS, "llm.model_name": "gpt-4o-mini"}, 150_000_000, 150_000_000, False),
        ({**TOKENS, "llm.response.model_name": "gpt-4o-mini"}, 150_000_000, 150_000_000, False),
        ({**TOKENS, "gen_ai.request.model": "gpt-4o-mini"}, 150_000_000, 150_000_000, False),
        (
            {**TOKENS, "gen_ai.response.model": "gpt-4o-mini", "gen_ai.request.model": "gpt-4o"},
            150_000_000,
            150_000_000,
            False,
        ),
        # unknown model, or none, with tokens: unpriced; without tokens: nothing to price
        ({**TOKENS, "llm.model_name": "in-house-llm-v2"}, 0, 0, True),
        (TOKENS, 0, 0, True),
        ({**LLM, "llm.model_name": "in-house-llm-v2"}, 0, 0, False),
    ],
)
def test_where_the_cost_comes_from(
    attrs: dict[str, Any], cost: int, estimated: int, unpriced: bool
) -> None:
    record = _record(attrs, ExtractionConfig(prices=PriceTable()))
    assert (record.cost_nanos, record.cost_estimated_nanos, record.unpriced) == (
        cost,
        estimated,
        unpriced,
    )


def test_the_model_dimension_names_models_as_the_table_does() -> None:
    config = ExtractionConfig(
        dimension_attributes=("env",), prices=PriceTable(), model_dimension=True
    )
    llm = {**TOKENS, "llm.model_name": "gpt-4o-mini-2024-07-18", "env": "prod"}
    assert _record(llm, config).dimensions == ("prod", "gpt-4o-mini")
    chain = {"openinference.span.kind": "CHAIN", "env": "prod", "llm.model_name": "gpt-4o"}
    assert _record(chain, config).dimensions == ("prod", "")
