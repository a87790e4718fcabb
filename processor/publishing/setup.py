"""One call that makes an agent process publish its spans to the processor's Kafka topic.

    from processor.publishing import configure_tracing

    configure_tracing(agent_name="support-orchestrator", project_name="support")
    # build and run LangChain / LangGraph agents as usual

What it sets up: a ``TracerProvider`` whose resource says who is publishing (``service.name``,
``agent.name``, ``openinference.project.name``), a ``BatchSpanProcessor`` feeding a
``KafkaSpanExporter`` (``KAFKA_BOOTSTRAP_SERVERS``, ``PROCESSOR_SPANS_TOPIC``, and the
``KAFKA_SECURITY_PROTOCOL`` / ``KAFKA_SASL_*`` / ``KAFKA_SSL_*`` settings the worker reads too)
exporting every second, LangGraph agent naming (``agent_names``), and, when
``openinference-instrumentation-langchain`` is installed, the OpenInference LangChain
instrumentor. The provider becomes the global one, so a later
``LangChainInstrumentor().instrument()`` or ``trace.get_tracer(...)`` uses it too.

Agent identity: a span's own ``agent.name`` wins; LangGraph spans get the name of the graph
node that ran them; the rest (the graph's root span, plain LangChain chains) fall back, in the
worker, to their ancestors' agent and then to ``service.name``, which is ``agent_name`` unless
``service_name`` says otherwise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.util.types import AttributeValue

from processor.kafka_security import aiokafka_security_options
from processor.publishing.agent_names import AGENT_NAME, LangGraphAgentSpanProcessor
from processor.publishing.kafka_exporter import KafkaSpanExporter
from processor.publishing.settings import load_publisher_settings

log = logging.getLogger(__name__)

SERVICE_NAME = "service.name"
PROJECT_NAME = "openinference.project.name"
# The SDK waits 5 s between exports by default: as long as the worker's default allowed
# lateness, so spans of a quiet agent would reach an idle partition already late. 1 s keeps
# them well inside it; OTEL_BSP_SCHEDULE_DELAY still overrides.
DEFAULT_SCHEDULE_DELAY_MS = 1_000


def configure_tracing(
    *,
    agent_name: str,
    project_name: str | None = None,
    service_name: str | None = None,
    bootstrap_servers: str | None = None,
    topic: str | None = None,
    agent_nodes: Mapping[str, str] | Collection[str] | None = None,
    name_langgraph_agents: bool = True,
    instrument_langchain: bool = True,
    resource_attributes: Mapping[str, AttributeValue] | None = None,
    set_global: bool = True,
    exporter: SpanExporter | None = None,
) -> TracerProvider:
    """Set up tracing to Kafka and return the ``TracerProvider`` (shut down at exit).

    ``bootstrap_servers`` and ``topic`` default to ``KAFKA_BOOTSTRAP_SERVERS`` and
    ``PROCESSOR_SPANS_TOPIC`` (``otlp_spans``). ``agent_nodes`` says which LangGraph nodes are
    agents (default: every node of the top graph; see ``agent_names``). ``exporter`` replaces
    the Kafka exporter (an ``InMemorySpanExporter`` in tests, say). ``set_global=False`` leaves
    the global tracer provider alone.

    Raises ``ValueError`` for an empty ``agent_name`` and ``ConfigurationError`` for malformed
    settings; nothing here waits for Kafka (the exporter connects on its first export).
    """
    if not agent_name:
        raise ValueError("agent_name must not be empty")
    attributes: dict[str, AttributeValue] = dict(resource_attributes or {})
    attributes[SERVICE_NAME] = service_name or agent_name
    attributes[AGENT_NAME] = agent_name
    if project_name:
        attributes[PROJECT_NAME] = project_name
    provider = TracerProvider(resource=Resource.create(attributes))

    if exporter is None:
        # Read even when both are given: how to connect (TLS, SASL) comes from the environment.
        settings = load_publisher_settings()
        exporter = KafkaSpanExporter(
            bootstrap_servers=bootstrap_servers or settings.kafka_bootstrap_servers,
            topic=topic or settings.spans_topic,
            producer_options=aiokafka_security_options(settings),
        )
    schedule_delay_ms = (
        None if os.environ.get("OTEL_BSP_SCHEDULE_DELAY") else DEFAULT_SCHEDULE_DELAY_MS
    )
    processor: SpanProcessor = BatchSpanProcessor(exporter, schedule_delay_millis=schedule_delay_ms)
    if name_langgraph_agents:
        processor = LangGraphAgentSpanProcessor(processor, agent_nodes)
    provider.add_span_processor(processor)

    if set_global:
        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider):
            log.warning(
                "a global TracerProvider is already set and cannot be replaced; spans of "
                "tracers taken from it do not reach Kafka (pass set_global=False to silence)"
            )
        else:
            trace.set_tracer_provider(provider)
    if instrument_langchain:
        _instrument_langchain(provider)
    return provider


def _instrument_langchain(provider: TracerProvider) -> bool:
    """Instrument LangChain with OpenInference if it is installed; True if spans will flow."""
    try:
        from openinference.instrumentation.langchain import LangChainInstrumentor
    except ImportError:
        log.info("openinference-instrumentation-langchain is not installed: LangChain not traced")
        return False
    instrumentor = LangChainInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        # Instrumented earlier, e.g. by `LangChainInstrumentor().instrument()` before this
        # call: its tracer came from the global provider, which is now this one.
        return True
    instrumentor.instrument(tracer_provider=provider)
    return True
