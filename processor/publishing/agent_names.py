"""Name the agent of each LangGraph span: ``agent.name`` from the graph node that ran it.

OpenInference's LangChain instrumentor sets no ``agent.name``: it records the node only inside
the ``metadata`` attribute, a JSON string LangGraph fills with ``langgraph_node`` (the node
running now) and ``langgraph_checkpoint_ns`` (``outer:<id>|inner:<id>``, the path of nodes
from the top graph down through subgraphs). Two agents in one process share one resource, so
the resource cannot tell them apart; the node can.

The rule: a span that carries LangGraph metadata and no ``agent.name`` of its own gets
``agent.name`` = the *outermost* node on its path (an agent built as a subgraph, with its own
``agent``/``tools`` nodes inside, is one agent). With ``agent_nodes`` given, only those nodes
are agents, renamed through the mapping when it is one, and the *innermost* listed node on the
path wins (a team subgraph inside a supervisor graph can name its own members). A span outside
any agent node (the graph's own root span, a router node not listed) gets nothing: the worker
then takes its nearest ancestor's agent, else the resource's ``service.name``.

The instrumentor sets the metadata when the span ends, after which the SDK's span is
read-only; so the naming happens in ``on_end``, on a copy handed to the wrapped processor.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import orjson
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.util import BoundedList

AGENT_NAME = "agent.name"
METADATA = "metadata"
_NODE_MARKER = "langgraph_node"


def langgraph_path(metadata: str) -> tuple[str, ...]:
    """Node names from the top graph down to the node that ran the span; () if none."""
    if _NODE_MARKER not in metadata:  # most spans: skip parsing
        return ()
    try:
        document = orjson.loads(metadata)
    except orjson.JSONDecodeError:
        return ()
    if not isinstance(document, dict):
        return ()
    namespace = document.get("langgraph_checkpoint_ns")
    if isinstance(namespace, str) and namespace:
        # "writer:1c5d...|draft:c55d..." -> ("writer", "draft"); task ids follow the colon.
        path = tuple(part.partition(":")[0] for part in namespace.split("|"))
        if all(path):
            return path
    node = document.get(_NODE_MARKER)
    return (node,) if isinstance(node, str) and node else ()


class LangGraphAgentNames:
    """Which node of a LangGraph path names the agent (see the module docstring)."""

    def __init__(self, agent_nodes: Mapping[str, str] | Collection[str] | None = None) -> None:
        if agent_nodes is None:
            self._names: Mapping[str, str] | None = None
        elif isinstance(agent_nodes, Mapping):
            self._names = dict(agent_nodes)
        elif isinstance(agent_nodes, str):
            raise ValueError("agent_nodes must be a collection of node names, not one string")
        else:
            self._names = {node: node for node in agent_nodes}
        if self._names is not None:
            for node, agent in self._names.items():
                if not node or not agent:
                    raise ValueError(f"agent_nodes has an empty name: {node!r} -> {agent!r}")

    def agent_of(self, path: tuple[str, ...]) -> str | None:
        if not path:
            return None
        if self._names is None:
            return path[0]
        for node in reversed(path):
            agent = self._names.get(node)
            if agent is not None:
                return agent
        return None

    def agent_of_span(self, attributes: Mapping[str, Any]) -> str | None:
        """The agent to set on a span with these attributes, or None to leave it alone."""
        if attributes.get(AGENT_NAME):
            return None
        metadata = attributes.get(METADATA)
        if not isinstance(metadata, str):
            return None
        return self.agent_of(langgraph_path(metadata))


class LangGraphAgentSpanProcessor(SpanProcessor):
    """Wraps ``processor`` and hands it each ended span with its ``agent.name`` set."""

    def __init__(
        self,
        processor: SpanProcessor,
        agent_nodes: Mapping[str, str] | Collection[str] | None = None,
    ) -> None:
        self._processor = processor
        self._names = LangGraphAgentNames(agent_nodes)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._processor.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        attributes = span.attributes or {}
        agent = self._names.agent_of_span(attributes)
        if agent is not None:
            span = _with_attribute(span, AGENT_NAME, agent)
        self._processor.on_end(span)

    def shutdown(self) -> None:
        self._processor.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._processor.force_flush(timeout_millis)


def _with_attribute(span: ReadableSpan, key: str, value: str) -> ReadableSpan:
    """A copy of ``span`` with one more attribute (the SDK's ended spans are read-only)."""
    attributes = BoundedAttributes(
        maxlen=None, attributes={**(span.attributes or {}), key: value}, immutable=True
    )
    attributes.dropped = span.dropped_attributes
    events = BoundedList.from_seq(None, span.events)
    events.dropped = span.dropped_events
    links = BoundedList.from_seq(None, span.links)
    links.dropped = span.dropped_links
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attributes,
        events=events,
        links=links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )
