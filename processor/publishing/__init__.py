"""Publishing from agents: OpenTelemetry spans to the processor's Kafka topic.

Needs the ``agents`` extra (``pip install agent-trace-processor[agents]``): the OpenTelemetry
SDK and its OTLP encoder, which the worker itself does not use.

- ``configure_tracing``: one call for LangChain / LangGraph agent processes.
- ``KafkaSpanExporter``: the SDK span exporter, for a hand-built pipeline.
- ``LangGraphAgentSpanProcessor``: ``agent.name`` from the LangGraph node that ran a span.
"""

from __future__ import annotations

try:
    from processor.publishing.agent_names import (
        LangGraphAgentNames,
        LangGraphAgentSpanProcessor,
    )
    from processor.publishing.kafka_exporter import ExporterStats, KafkaSpanExporter
    from processor.publishing.settings import PublisherSettings
    from processor.publishing.setup import configure_tracing
except ImportError as exc:  # pragma: no cover - depends on what is installed
    if exc.name and exc.name.startswith("opentelemetry"):
        raise ImportError(
            f"processor.publishing needs {exc.name}: pip install 'agent-trace-processor[agents]'"
        ) from exc
    raise

__all__ = [
    "ExporterStats",
    "KafkaSpanExporter",
    "LangGraphAgentNames",
    "LangGraphAgentSpanProcessor",
    "PublisherSettings",
    "configure_tracing",
]
