"""``agent.name`` from the LangGraph node that ran a span.

What a user relies on: two agents in one process (one resource) are told apart by the graph
node they run in, an agent built as a subgraph stays one agent, a name the span already has is
never overwritten, and the span otherwise reaches the exporter unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from processor.publishing.agent_names import (
    LangGraphAgentNames,
    LangGraphAgentSpanProcessor,
    langgraph_path,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "langgraph_two_agents.py"


def metadata(**values: object) -> str:
    return json.dumps({"ls_integration": "langgraph", **values})


@pytest.mark.parametrize(
    ("text", "path"),
    [
        (metadata(langgraph_node="researcher"), ("researcher",)),
        (
            metadata(langgraph_node="researcher", langgraph_checkpoint_ns="researcher:0341-f5"),
            ("researcher",),
        ),
        (
            metadata(langgraph_node="draft", langgraph_checkpoint_ns="writer:1c5d|draft:c55d"),
            ("writer", "draft"),
        ),
        (metadata(), ()),  # the graph's root span: no node
        ('{"langgraph_node": 3}', ()),
        ("not json but mentions langgraph_node", ()),
        ('["langgraph_node"]', ()),
        ("", ()),
        # A namespace with an empty segment is not trusted; the node still names the span.
        (metadata(langgraph_node="draft", langgraph_checkpoint_ns="|draft:1"), ("draft",)),
    ],
)
def test_langgraph_path_from_metadata(text: str, path: tuple[str, ...]) -> None:
    assert langgraph_path(text) == path


@pytest.mark.parametrize(
    ("agent_nodes", "path", "agent"),
    [
        (None, ("researcher",), "researcher"),
        (None, ("writer", "draft"), "writer"),  # a subgraph agent is one agent
        (None, (), None),
        ({"writer"}, ("researcher",), None),  # not an agent: the ancestor's agent applies
        ({"writer"}, ("writer", "draft"), "writer"),
        ({"team": "support-team", "triage": "triage-bot"}, ("team", "triage"), "triage-bot"),
        ({"team": "support-team", "triage": "triage-bot"}, ("team", "reply"), "support-team"),
        (["researcher", "writer"], ("writer", "review"), "writer"),
    ],
)
def test_which_node_names_the_agent(
    agent_nodes: object, path: tuple[str, ...], agent: str | None
) -> None:
    assert LangGraphAgentNames(agent_nodes).agent_of(path) == agent  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["researcher", {"": "x"}, {"node": ""}])
def test_bad_agent_nodes_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="agent_nodes"):
        LangGraphAgentNames(bad)  # type: ignore[arg-type]


def spans_through_processor(
    attributes: list[dict[str, str]], **limits: int
) -> tuple[list[ReadableSpan], InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(span_limits=SpanLimits(**limits))
    provider.add_span_processor(LangGraphAgentSpanProcessor(SimpleSpanProcessor(exporter)))
    tracer = provider.get_tracer("test")
    for index, values in enumerate(attributes):
        with tracer.start_as_current_span(f"span-{index}") as span:
            span.set_attributes(values)
            span.add_event("thinking", {"step": index})
    provider.shutdown()
    return list(exporter.get_finished_spans()), exporter


def test_span_inside_a_node_gets_the_node_as_agent_and_keeps_the_rest() -> None:
    [span], _ = spans_through_processor(
        [{"metadata": metadata(langgraph_node="researcher"), "llm.token_count.total": "12"}]
    )
    assert span.attributes is not None
    assert span.attributes["agent.name"] == "researcher"
    assert span.attributes["llm.token_count.total"] == "12"
    assert span.name == "span-0"
    assert [event.name for event in span.events] == ["thinking"]
    assert span.end_time is not None and span.start_time is not None


def test_a_name_the_span_already_has_wins() -> None:
    [span], _ = spans_through_processor(
        [{"metadata": metadata(langgraph_node="researcher"), "agent.name": "billing-agent"}]
    )
    assert span.attributes is not None
    assert span.attributes["agent.name"] == "billing-agent"


def test_spans_without_langgraph_metadata_are_left_alone() -> None:
    [plain, root], _ = spans_through_processor([{"input.value": "hi"}, {"metadata": metadata()}])
    assert plain.attributes is not None and "agent.name" not in plain.attributes
    assert root.attributes is not None and "agent.name" not in root.attributes


def test_dropped_attribute_counts_survive_the_copy() -> None:
    values = {f"k{i}": "v" for i in range(5)}
    values["metadata"] = metadata(langgraph_node="writer")
    [span], _ = spans_through_processor([values], max_span_attributes=4)
    assert span.dropped_attributes == 2  # 6 set, 4 kept; agent.name comes on top
    assert span.attributes is not None and span.attributes["agent.name"] == "writer"


@pytest.fixture
def example() -> Iterator[ModuleType]:
    pytest.importorskip("langgraph")
    pytest.importorskip("openinference.instrumentation.langchain")
    spec = importlib.util.spec_from_file_location("langgraph_two_agents", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    try:
        yield module
    finally:
        del sys.modules[spec.name]


def test_the_example_graphs_spans_are_named_after_their_agents(example: ModuleType) -> None:
    from openinference.instrumentation.langchain import LangChainInstrumentor

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(LangGraphAgentSpanProcessor(SimpleSpanProcessor(exporter)))
    instrumentor = LangChainInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        example.build_graph().invoke({"question": "Why?"})
    finally:
        instrumentor.uninstrument()
        provider.shutdown()
    spans = exporter.get_finished_spans()

    by_id = {span.context.span_id: span for span in spans}
    [root] = [span for span in spans if span.parent is None]
    assert root.attributes is not None and "agent.name" not in root.attributes
    tokens: dict[str, list[tuple[object, object]]] = {}
    for span in spans:
        if span is root:
            continue
        assert span.attributes is not None
        agent = span.attributes["agent.name"]
        # Every span below a node carries that node's agent: the top graph's node is the agent.
        top = span
        while top.parent is not None and top.parent.span_id != root.context.span_id:
            top = by_id[top.parent.span_id]
        assert agent == top.name, (span.name, agent, top.name)
        if span.attributes.get("openinference.span.kind") == "LLM":
            tokens.setdefault(str(agent), []).append(
                (
                    span.attributes["llm.token_count.prompt"],
                    span.attributes["llm.token_count.completion"],
                )
            )
    assert {agent: sorted(calls) for agent, calls in tokens.items()} == {
        agent: sorted(usage) for agent, usage in example.AGENT_USAGE.items()
    }
