"""The shape of one generated trace: which spans, nested how, lasting how long, failing where.

`TraceShaper.shape` turns a seeded RNG and an end time into a tree of `SpanNode`s with absolute
integer-nanosecond times. It knows nothing of protobuf; `traces.py` encodes the tree.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Literal

from processor.loadgen.scenario import UNPRICED_MODEL, AgentProfile, Scenario, model_price

SpanKind = Literal["AGENT", "CHAIN", "LLM", "TOOL", "RETRIEVER"]
# How an LLM span names its attributes: OpenInference's ``llm.*`` (LangChain's
# instrumentation) or the OpenTelemetry GenAI conventions' ``gen_ai.*``.
Convention = Literal["openinference", "genai"]

_NS_PER_MS = 1_000_000
# Chance that an error in a child escapes into its parent (LangChain agents often catch a tool
# error and hand it back to the LLM as an observation; the rest re-raise).
_PROPAGATION_PROBABILITY = 0.5
# Chance that the orchestrator fans its specialist calls out in parallel (LangGraph `Send`).
_PARALLEL_FAN_OUT_PROBABILITY = 0.3
# Chance that a CHAIN wrapping LLM calls repeats their token counts, as the OpenInference
# LangChain instrumentation does; a processor that sums every span's tokens double counts.
_CHAIN_REPEATS_TOKENS_PROBABILITY = 0.5
# Chance that a specialist hands a step to another specialist (a nested AGENT span), and
# that the nested agent is itself (a recursive subgraph: not a new invocation by the rules).
_DELEGATION_PROBABILITY = 0.08
_SELF_DELEGATION_PROBABILITY = 0.15
# Rate-limit retries and cold caches: a few calls take several times longer than usual.
_SLOW_CALL_PROBABILITY = 0.03
# Chance that an LLM call goes through a client instrumented with the GenAI conventions
# (e.g. opentelemetry-instrumentation-openai-v2) rather than LangChain's OpenInference one;
# the GenAI conventions have no cost attribute, so these calls never report one.
_GENAI_CONVENTION_PROBABILITY = 0.2
# Chance that an OpenInference LLM call reports no cost (its instrumentation had no price).
# With the GenAI calls and the unpriced model about 30% of calls carry no cost.
_UNREPORTED_COST_PROBABILITY = 0.12
# Chance that a call is routed to the self-hosted model no price table knows.
_UNPRICED_MODEL_PROBABILITY = 0.03
# Chance that a call's prompt starts with a cached prefix (a system prompt, earlier turns),
# read back from the provider's prompt cache; the share of the prompt it covers.
_CACHE_READ_PROBABILITY = 0.4
_CACHE_READ_SHARE = (0.3, 0.95)
# Chance that an Anthropic call that read no cache writes one (Anthropic reports cache
# writes, billed above the input rate; OpenAI caches without reporting writes).
_CACHE_WRITE_PROBABILITY = 0.15
_CACHE_WRITE_SHARE = (0.5, 1.0)
# The share of a reasoning call's completion spent on reasoning tokens.
_REASONING_SHARE = (0.3, 0.85)

_LLM_ERRORS = (
    "RateLimitError: Error code: 429 - rate limit exceeded, retry after 20s",
    "APITimeoutError: Request timed out.",
    "BadRequestError: Error code: 400 - context_length_exceeded",
)
_TOOL_ERRORS = (
    "ToolException: {tool} timed out after 30s",
    "ToolException: {tool} returned HTTP 502 Bad Gateway",
    "ValidationError: 1 validation error for {tool} input",
)
_RETRIEVER_ERRORS = (
    "ConnectionError: vector store unavailable",
    "TimeoutError: similarity search exceeded 5s",
)


@dataclass(slots=True, eq=False)
class SpanNode:
    """One span of a trace being shaped. Times are filled in by `TraceShaper.shape`."""

    kind: SpanKind
    name: str
    agent: AgentProfile
    # The agent.name attribute; only AGENT spans carry one.
    agent_name: str | None = None
    children: list[SpanNode] = field(default_factory=list)
    parallel: bool = False
    model: str | None = None
    tool: str | None = None
    convention: Convention = "openinference"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Parts of the prompt and of the completion, as providers report them.
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    reports_cost: bool = False
    repeats_child_tokens: bool = False
    error_message: str | None = None
    own_error: bool = False
    duration_ns: int = 0
    offset_ns: int = 0  # start, relative to the parent's start
    start_ns: int = 0
    end_ns: int = 0
    depth: int = 0

    @property
    def has_tokens(self) -> bool:
        """An LLM call that returned usage (a failed call reports none)."""
        return self.kind == "LLM" and not self.own_error

    def walk(self) -> list[SpanNode]:
        """This node and all its descendants, parents before children."""
        nodes = [self]
        for child in self.children:
            nodes.extend(child.walk())
        return nodes


class TraceShaper:
    """Builds trace trees for one scenario. Holds no per-trace state."""

    def __init__(self, scenario: Scenario) -> None:
        profiles = scenario.profiles()
        self._scenario = scenario
        self._time_scale = scenario.latency_scale
        self._orchestrator = profiles[0]
        self._specialists = profiles[1:]
        self._popularity = list(
            itertools.accumulate(profile.popularity for profile in self._specialists)
        )

    def shape(self, rng: random.Random, end_ns: int) -> SpanNode:
        """A trace whose root span ends at ``end_ns``, every child inside its parent in time."""
        size = self._sample_size(rng)
        root = self._orchestrator_call(rng, size)
        self._finish(rng, root)
        root.start_ns = end_ns - root.duration_ns
        if root.start_ns < 0:
            raise ValueError(f"a trace ending at {end_ns} ns would start before the epoch")
        self._place(root)
        return root

    def _sample_size(self, rng: random.Random) -> int:
        # Lognormal around the mean: most traces near the asked size, a few much larger.
        sigma = 0.4
        factor = rng.lognormvariate(-sigma * sigma / 2, sigma)  # mean 1
        mean = self._scenario.trace_size
        return max(3, min(round(mean * factor), 10 * mean))

    # Structure -----------------------------------------------------------------------------

    def _orchestrator_call(self, rng: random.Random, size: int) -> SpanNode:
        orchestrator = self._orchestrator
        root = SpanNode("AGENT", orchestrator.name, orchestrator, agent_name=orchestrator.name)
        remaining = size - 1
        before: list[SpanNode] = []
        after: list[SpanNode] = []
        # Every trace keeps room for one specialist call (its AGENT span and one child).
        if remaining >= 5:
            before.append(self._llm_chain(rng, orchestrator, "plan"))
            remaining -= 2
        if remaining >= 3:
            after.append(self._llm(rng, orchestrator))
            remaining -= 1
        # A parallel fan-out (LangGraph `Send`) wraps two or more calls in one more CHAIN.
        fan_out = remaining >= 5 and rng.random() < _PARALLEL_FAN_OUT_PROBABILITY
        if fan_out:
            remaining -= 1
        per_call = rng.uniform(4.0, 9.0)
        fewest_calls = 2 if fan_out else 1
        call_count = max(fewest_calls, min(remaining // 2, round(remaining / per_call)))
        budgets = [2] * call_count
        for _ in range(remaining - 2 * call_count):
            budgets[rng.randrange(call_count)] += 1
        callees = rng.choices(self._specialists, cum_weights=self._popularity, k=call_count)
        calls = [
            self._specialist_call(rng, callee, budget, nested=False)
            for callee, budget in zip(callees, budgets, strict=True)
        ]
        if fan_out:
            calls = [SpanNode("CHAIN", "fan_out", orchestrator, children=calls, parallel=True)]
        root.children = [*before, *calls, *after]
        return root

    def _specialist_call(
        self, rng: random.Random, agent: AgentProfile, budget: int, *, nested: bool
    ) -> SpanNode:
        node = SpanNode("AGENT", agent.name, agent, agent_name=agent.name)
        node.children = self._steps(rng, agent, budget - 1, nested=nested)
        return node

    def _steps(
        self, rng: random.Random, agent: AgentProfile, budget: int, *, nested: bool
    ) -> list[SpanNode]:
        steps: list[SpanNode] = []
        if agent.uses_retriever and budget >= 1 and rng.random() < 0.6:
            steps.append(self._leaf(rng, agent, "RETRIEVER"))
            budget -= 1
        while budget > 0:
            draw = rng.random()
            if not nested and budget >= 4 and draw < _DELEGATION_PROBABILITY:
                delegate = agent
                if rng.random() >= _SELF_DELEGATION_PROBABILITY and len(self._specialists) > 1:
                    delegate = rng.choice([s for s in self._specialists if s is not agent])
                sub_budget = rng.randint(2, budget // 2)
                steps.append(self._specialist_call(rng, delegate, sub_budget, nested=True))
                budget -= sub_budget
            elif budget >= 3 and agent.tools and draw < 0.45:
                # A ReAct step: the LLM picks a tool, the tool runs.
                step = SpanNode("CHAIN", "agent_step", agent)
                step.children = [self._llm(rng, agent), self._leaf(rng, agent, "TOOL")]
                step.repeats_child_tokens = rng.random() < _CHAIN_REPEATS_TOKENS_PROBABILITY
                steps.append(step)
                budget -= 3
            elif budget >= 2 and draw < 0.75:
                steps.append(self._llm_chain(rng, agent, "RunnableSequence"))
                budget -= 2
            else:
                kinds: list[SpanKind] = ["LLM"]
                if agent.tools:
                    kinds.append("TOOL")
                if agent.uses_retriever:
                    kinds.append("RETRIEVER")
                steps.append(self._leaf(rng, agent, rng.choice(kinds)))
                budget -= 1
        return steps

    def _llm_chain(self, rng: random.Random, agent: AgentProfile, name: str) -> SpanNode:
        chain = SpanNode("CHAIN", name, agent, children=[self._llm(rng, agent)])
        chain.repeats_child_tokens = rng.random() < _CHAIN_REPEATS_TOKENS_PROBABILITY
        return chain

    def _llm(self, rng: random.Random, agent: AgentProfile) -> SpanNode:
        model = agent.model
        if rng.random() < _UNPRICED_MODEL_PROBABILITY:
            model = UNPRICED_MODEL.model
        price = model_price(model)
        genai = rng.random() < _GENAI_CONVENTION_PROBABILITY
        node = SpanNode(
            "LLM",
            f"chat {model}" if genai else price.span_name,  # GenAI's "{operation} {model}"
            agent,
            model=model,
            convention="genai" if genai else "openinference",
        )
        node.prompt_tokens = max(1, int(rng.lognormvariate(math.log(900.0), 0.7)))
        node.completion_tokens = max(1, int(rng.lognormvariate(math.log(160.0), 0.8)))
        if rng.random() < _CACHE_READ_PROBABILITY:
            node.cache_read_tokens = int(node.prompt_tokens * rng.uniform(*_CACHE_READ_SHARE))
        elif price.provider == "anthropic" and rng.random() < _CACHE_WRITE_PROBABILITY:
            node.cache_write_tokens = int(node.prompt_tokens * rng.uniform(*_CACHE_WRITE_SHARE))
        if rng.random() < price.reasoning_probability:
            node.reasoning_tokens = int(node.completion_tokens * rng.uniform(*_REASONING_SHARE))
        node.reports_cost = (
            not genai
            and model != UNPRICED_MODEL.model
            and rng.random() >= _UNREPORTED_COST_PROBABILITY
        )
        return node

    def _leaf(self, rng: random.Random, agent: AgentProfile, kind: SpanKind) -> SpanNode:
        if kind == "LLM":
            return self._llm(rng, agent)
        if kind == "TOOL":
            tool = rng.choice(agent.tools)
            return SpanNode("TOOL", tool, agent, tool=tool)
        return SpanNode("RETRIEVER", "VectorStoreRetriever", agent)

    # Durations and errors, bottom-up -------------------------------------------------------

    def _finish(self, rng: random.Random, node: SpanNode) -> None:
        if not node.children:
            self._finish_leaf(rng, node)
            return
        for child in node.children:
            self._finish(rng, child)
        lead_ns = self._ns(rng.uniform(0.2, 4.0))
        if node.parallel:
            for child in node.children:
                child.offset_ns = lead_ns + self._ns(rng.uniform(0.0, 2.0))
            body_end = max(child.offset_ns + child.duration_ns for child in node.children)
        else:
            cursor = lead_ns
            for child in node.children:
                child.offset_ns = cursor
                cursor += child.duration_ns + self._ns(rng.uniform(0.05, 2.0))
            body_end = cursor
        node.duration_ns = body_end + self._ns(rng.uniform(0.2, 4.0))
        failed = [child for child in node.children if child.error_message is not None]
        if failed and rng.random() < _PROPAGATION_PROBABILITY:
            node.error_message = failed[0].error_message

    def _finish_leaf(self, rng: random.Random, node: SpanNode) -> None:
        agent = node.agent
        if node.kind == "LLM":
            assert node.model is not None
            per_token_ms = model_price(node.model).ms_per_completion_token
            ms = rng.lognormvariate(math.log(250.0), 0.5) + node.completion_tokens * per_token_ms
        elif node.kind == "TOOL":
            ms = rng.lognormvariate(math.log(120.0), 1.0)
        else:
            ms = rng.lognormvariate(math.log(60.0), 0.6)
        if rng.random() < _SLOW_CALL_PROBABILITY:
            ms *= rng.uniform(3.0, 12.0)
        if rng.random() < agent.error_rate:
            node.own_error = True
            node.error_message = self._error_message(rng, node)
            # Most failures come back fast (429, 400); timeouts are already slow enough.
            ms *= 0.3
        node.duration_ns = max(self._ns(ms * agent.latency_scale), 10_000)

    @staticmethod
    def _error_message(rng: random.Random, node: SpanNode) -> str:
        if node.kind == "LLM":
            return rng.choice(_LLM_ERRORS)
        if node.kind == "TOOL":
            return rng.choice(_TOOL_ERRORS).format(tool=node.tool)
        return rng.choice(_RETRIEVER_ERRORS)

    def _ns(self, ms: float) -> int:
        return int(ms * self._time_scale * _NS_PER_MS)

    # Absolute times, top-down --------------------------------------------------------------

    def _place(self, node: SpanNode) -> None:
        node.end_ns = node.start_ns + node.duration_ns
        for child in node.children:
            child.start_ns = node.start_ns + child.offset_ns
            child.depth = node.depth + 1
            self._place(child)
