"""The simulated agent application: who calls whom, how fast, how often things fail, what it costs.

A `Scenario` is the handful of knobs a user sets; `AgentProfile` is what the generator derives
from it, deterministically from the seed, for the orchestrator and each specialist.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

# How much text spans carry: ``small`` (only a root's short question), or ``realistic``
# (prompts and completions of 0.3-4 KB on LLM and agent spans, as instrumentations record them).
Payloads = Literal["small", "realistic"]
PAYLOADS: tuple[Payloads, ...] = ("small", "realistic")

ORCHESTRATOR = "orchestrator"

# LangGraph-style node names; past the end of this list specialists are numbered.
SPECIALIST_NAMES = (
    "researcher",
    "coder",
    "critic",
    "planner",
    "retriever-agent",
    "summarizer",
    "translator",
    "math",
    "sql",
    "writer",
    "reviewer",
    "scheduler",
)

# What each named specialist reaches for besides its LLM: (tools, uses a retriever).
_SPECIALIST_KITS: dict[str, tuple[tuple[str, ...], bool]] = {
    "researcher": (("web_search", "fetch_url"), True),
    "coder": (("python_repl", "run_tests"), False),
    "critic": ((), False),
    "planner": (("task_board",), False),
    "retriever-agent": (("rerank",), True),
    "summarizer": ((), True),
    "translator": (("glossary_lookup",), False),
    "math": (("calculator", "python_repl"), False),
    "sql": (("sql_query", "describe_table"), False),
    "writer": (("style_check",), True),
    "reviewer": (("diff_viewer",), False),
    "scheduler": (("calendar_lookup", "send_invite"), False),
}
_GENERIC_KIT: tuple[tuple[str, ...], bool] = (("http_request",), True)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """A model the simulated agents call: how its spans name it and its vendor, the list price
    its instrumentation reports (USD per million tokens; cache reads at their own rate), how
    fast it writes, and how often a call reasons before it answers."""

    model: str
    provider: str
    span_name: str
    prompt_usd_per_mtok: float
    completion_usd_per_mtok: float
    cache_read_usd_per_mtok: float
    ms_per_completion_token: float
    reasoning_probability: float = 0.0


# Real model names of two providers, all in genai-prices' catalogue, so the worker can price
# the calls that report no cost. o3-mini always reasons; Claude Sonnet 4 thinks (extended
# thinking) on some calls; the others never do. Anthropic reports prompt-cache writes.
MODEL_PRICES: dict[str, ModelPrice] = {
    price.model: price
    for price in (
        ModelPrice("gpt-4o", "openai", "ChatOpenAI", 2.50, 10.00, 1.25, 12.0),
        ModelPrice("gpt-4o-mini", "openai", "ChatOpenAI", 0.15, 0.60, 0.075, 6.0),
        ModelPrice("o3-mini", "openai", "ChatOpenAI", 1.10, 4.40, 0.55, 9.0, 1.0),
        ModelPrice(
            "claude-sonnet-4-20250514", "anthropic", "ChatAnthropic", 3.00, 15.00, 0.30, 14.0, 0.5
        ),
        ModelPrice(
            "claude-3-5-haiku-20241022", "anthropic", "ChatAnthropic", 0.80, 4.00, 0.08, 7.0
        ),
    )
}

# A self-hosted model behind an OpenAI-compatible server: no price table knows it and its
# spans never report a cost, so its calls are what the worker counts as unpriced. Agents are
# not built on it; a few calls are routed to it (see ``trace_shape``).
UNPRICED_MODEL = ModelPrice("in-house-llm-v2", "vllm", "ChatOpenAI", 0.0, 0.0, 0.0, 8.0)


def model_price(model: str) -> ModelPrice:
    """The price entry of any model the generator uses, the unpriced one included."""
    return UNPRICED_MODEL if model == UNPRICED_MODEL.model else MODEL_PRICES[model]


def llm_cost_usd(
    model: str, prompt_tokens: int, completion_tokens: int, cache_read_tokens: int = 0
) -> float:
    """The cost an instrumentation reports for one LLM call, from the scenario's list prices
    (cache reads, a part of the prompt, at their own rate), rounded to a millionth of a
    dollar. It need not equal genai-prices' price: a reported cost wins over the table."""
    price = model_price(model)
    cost = (
        (prompt_tokens - cache_read_tokens) * price.prompt_usd_per_mtok
        + cache_read_tokens * price.cache_read_usd_per_mtok
        + completion_tokens * price.completion_usd_per_mtok
    ) / 1_000_000
    return round(cost, 6)


@dataclass(frozen=True, slots=True)
class AgentProfile:
    """How one agent behaves in generated traces.

    ``error_rate`` is the probability that one of the agent's LLM, tool or retriever calls fails
    on its own; ``latency_scale`` multiplies the durations of those calls; ``popularity`` is the
    orchestrator's relative preference for calling this agent.
    """

    name: str
    model: str
    tools: tuple[str, ...]
    uses_retriever: bool
    error_rate: float
    latency_scale: float
    popularity: float


@dataclass(frozen=True, slots=True)
class Scenario:
    """The knobs of the generated traffic. Invalid values raise `ValueError` at construction.

    ``agents`` counts the specialists (the orchestrator comes on top); ``trace_size`` is the
    mean number of spans per trace; ``error_rate`` is about the mean, over agents, of the
    probability that a single LLM/tool/retriever call fails (0: none fail, 1: all do);
    ``seed`` fixes everything random; ``latency_scale`` multiplies every duration (at 1.0 a
    20-span trace lasts ~15 s and a 100-span trace ~60 s, median; shrink it when the
    processor's allowed lateness is short); ``payloads`` is how much text spans carry
    (``realistic``: the inputs, outputs and messages of LLM and agent spans, 0.3-4 KB each).
    """

    agents: int = 10
    trace_size: int = 20
    error_rate: float = 0.05
    seed: int = 0
    service_name: str = "agent-app"
    latency_scale: float = 1.0
    payloads: Payloads = "small"

    def __post_init__(self) -> None:
        if not 1 <= self.agents <= 1000:
            raise ValueError(f"agents must be between 1 and 1000, got {self.agents}")
        if not 4 <= self.trace_size <= 10_000:
            raise ValueError(f"trace_size must be between 4 and 10000 spans, got {self.trace_size}")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be between 0 and 1, got {self.error_rate}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0.0 < self.latency_scale <= 1000.0:
            raise ValueError(f"latency_scale must be in (0, 1000], got {self.latency_scale}")
        if not self.service_name:
            raise ValueError("service_name must not be empty")
        if self.payloads not in PAYLOADS:
            raise ValueError(
                f"payloads must be one of {', '.join(PAYLOADS)}, got {self.payloads!r}"
            )

    def specialist_names(self) -> tuple[str, ...]:
        named = SPECIALIST_NAMES[: self.agents]
        numbered = tuple(f"specialist-{i + 1}" for i in range(len(named), self.agents))
        return named + numbered

    def profiles(self) -> tuple[AgentProfile, ...]:
        """The orchestrator's profile first, then one per specialist; a function of the seed."""
        # A string seed is hashed with SHA-512, so profiles do not depend on PYTHONHASHSEED.
        rng = random.Random(f"loadgen-profiles/{self.seed}")
        models = sorted(MODEL_PRICES)
        names = self.specialist_names()
        # Spread error rates from about 0.2x to 1.8x the mean, so some agents are visibly worse
        # than others while the mean over agents stays near what the user asked for.
        if len(names) == 1:
            factors = [1.0]
        else:
            factors = [0.2 + 1.6 * i / (len(names) - 1) for i in range(len(names))]
            rng.shuffle(factors)
        orchestrator = AgentProfile(
            name=ORCHESTRATOR,
            model="gpt-4o",
            tools=(),
            uses_retriever=False,
            error_rate=_scaled_probability(self.error_rate, 0.5),
            latency_scale=1.0,
            popularity=0.0,
        )
        specialists: list[AgentProfile] = []
        for name, factor in zip(names, factors, strict=True):
            tools, uses_retriever = _SPECIALIST_KITS.get(name, _GENERIC_KIT)
            specialists.append(
                AgentProfile(
                    name=name,
                    model=rng.choice(models),
                    tools=tools,
                    uses_retriever=uses_retriever,
                    error_rate=_scaled_probability(self.error_rate, factor),
                    latency_scale=rng.lognormvariate(0.0, 0.5),
                    # Zipf-like: a few specialists get most of the calls, as in real apps.
                    popularity=1.0 / (len(specialists) + 1) ** 0.8,
                )
            )
        return (orchestrator, *specialists)


def _scaled_probability(probability: float, factor: float) -> float:
    """``probability * factor`` for small probabilities, staying within [0, 1]: 0 and 1 stay
    put, so ``error_rate`` 1 still means every call fails."""
    return 1.0 - (1.0 - probability) ** factor
