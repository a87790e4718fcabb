"""Attribute names this project reads, from OpenInference and OpenTelemetry GenAI conventions."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

AGENT_NAME = "agent.name"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"
SERVICE_NAME = "service.name"
PROJECT_NAME = "openinference.project.name"

SPAN_KIND = "openinference.span.kind"
LLM_KIND = "LLM"
GEN_AI_OPERATION = "gen_ai.operation.name"
# GenAI operations that are one model call; a span with one of these is an LLM span.
GEN_AI_LLM_OPERATIONS = frozenset({"chat", "text_completion", "generate_content", "completion"})

TOKENS_PROMPT = "llm.token_count.prompt"
TOKENS_COMPLETION = "llm.token_count.completion"
TOKENS_TOTAL = "llm.token_count.total"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
COST_TOTAL = "llm.cost.total"
MODEL_NAME = "llm.model_name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"

UNKNOWN_AGENT = "unknown"
OVERFLOW_SERIES = "__overflow__"


@dataclass(frozen=True, kw_only=True)
class ModelPrice:
    """USD per one million tokens."""

    prompt_per_million: float
    completion_per_million: float

    def __post_init__(self) -> None:
        for name in ("prompt_per_million", "completion_per_million"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ExtractionConfig:
    """What the decoder pulls out of attributes; checked when built (``ValueError``)."""

    agent_attributes: tuple[str, ...] = (AGENT_NAME, GEN_AI_AGENT_NAME)
    dimension_attributes: tuple[str, ...] = ()
    prices: Mapping[str, ModelPrice] = field(default_factory=dict)
    max_spans_per_message: int = 100_000
    max_attribute_value_bytes: int = 1 << 20
    # Every span attribute the decoder looks at; derived, so it can never go stale.
    wanted_keys: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.agent_attributes:
            raise ValueError("agent_attributes must name at least one attribute")
        if self.max_spans_per_message < 1:
            raise ValueError("max_spans_per_message must be at least 1")
        if self.max_attribute_value_bytes < 1:
            raise ValueError("max_attribute_value_bytes must be at least 1")
        wanted = frozenset(
            {
                *self.agent_attributes,
                *self.dimension_attributes,
                SPAN_KIND,
                GEN_AI_OPERATION,
                TOKENS_PROMPT,
                TOKENS_COMPLETION,
                TOKENS_TOTAL,
                GEN_AI_INPUT_TOKENS,
                GEN_AI_OUTPUT_TOKENS,
                COST_TOTAL,
                MODEL_NAME,
                GEN_AI_REQUEST_MODEL,
                GEN_AI_RESPONSE_MODEL,
            }
        )
        object.__setattr__(self, "wanted_keys", wanted)
