"""Attribute names this project reads, from OpenInference and OpenTelemetry GenAI conventions."""

from __future__ import annotations

from dataclasses import dataclass, field

from processor.core.pricing import PriceTable

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
# Parts of the prompt and completion counts, each convention's current name first, then
# names older instrumentations still write.
TOKENS_CACHE_READ = (
    "llm.token_count.prompt_details.cache_read",
    "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.cache_read_input_tokens",
)
TOKENS_CACHE_WRITE = (
    "llm.token_count.prompt_details.cache_write",
    "gen_ai.usage.cache_creation.input_tokens",
    "gen_ai.usage.cache_creation_input_tokens",
)
TOKENS_REASONING = (
    "llm.token_count.completion_details.reasoning",
    "gen_ai.usage.reasoning.output_tokens",
    "gen_ai.usage.reasoning_tokens",
)
TOKENS_PROMPT_AUDIO = "llm.token_count.prompt_details.audio"
TOKENS_COMPLETION_AUDIO = "llm.token_count.completion_details.audio"
COST_TOTAL = "llm.cost.total"
MODEL_NAMES = (
    "llm.model_name",
    "llm.response.model_name",
    "gen_ai.response.model",
    "gen_ai.request.model",
)
PROVIDER_NAMES = ("llm.provider", "gen_ai.provider.name", "gen_ai.system")
# The built-in model dimension's name, in MLflow tags (``dimension.model``) and records.
MODEL_DIMENSION = "model"

UNKNOWN_AGENT = "unknown"
OVERFLOW_SERIES = "__overflow__"


@dataclass(frozen=True, kw_only=True)
class ExtractionConfig:
    """What the decoder pulls out of attributes; checked when built (``ValueError``)."""

    agent_attributes: tuple[str, ...] = (AGENT_NAME, GEN_AI_AGENT_NAME)
    dimension_attributes: tuple[str, ...] = ()
    # Prices for LLM spans that report no cost; None: such spans are unpriced.
    prices: PriceTable | None = field(default=None, compare=False)
    # Whether the model (named as ``prices`` names it) is the last rollup dimension.
    model_dimension: bool = False
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
                *TOKENS_CACHE_READ,
                *TOKENS_CACHE_WRITE,
                *TOKENS_REASONING,
                TOKENS_PROMPT_AUDIO,
                TOKENS_COMPLETION_AUDIO,
                COST_TOTAL,
                *MODEL_NAMES,
                *PROVIDER_NAMES,
            }
        )
        object.__setattr__(self, "wanted_keys", wanted)
