"""``configure_tracing``: one call and an agent's spans flow, named after their agents.

What a user relies on: the resource says which agent published (the worker's fallback for
spans that name none), the settings come from the worker's environment variables, LangChain is
traced whether they call ``LangChainInstrumentor().instrument()`` before or after, and nothing
of this needs a broker to start.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from processor.errors import ConfigurationError
from processor.publishing import PublisherSettings, configure_tracing


@pytest.fixture
def clean_global_provider() -> Iterator[None]:
    """The global tracer provider can be set once per process; tests put it back."""
    yield
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture
def langchain() -> Iterator[type]:
    pytest.importorskip("langchain_core")
    module = pytest.importorskip("openinference.instrumentation.langchain")
    instrumentor_type: type = module.LangChainInstrumentor
    yield instrumentor_type
    if instrumentor_type().is_instrumented_by_opentelemetry:
        instrumentor_type().uninstrument()


def run_a_chain() -> None:
    from langchain_core.runnables import RunnableLambda

    (RunnableLambda(lambda text: text.upper()) | RunnableLambda(lambda text: text + "!")).invoke(
        "hi"
    )


def test_resource_names_the_agent_and_project() -> None:
    provider = configure_tracing(
        agent_name="researcher",
        project_name="support",
        resource_attributes={"deployment.environment": "test"},
        exporter=InMemorySpanExporter(),
        set_global=False,
        instrument_langchain=False,
    )
    attributes = provider.resource.attributes
    assert attributes["service.name"] == "researcher"
    assert attributes["agent.name"] == "researcher"
    assert attributes["openinference.project.name"] == "support"
    assert attributes["deployment.environment"] == "test"
    provider.shutdown()


def test_service_name_can_differ_from_the_agent() -> None:
    provider = configure_tracing(
        agent_name="researcher",
        service_name="support-bot",
        exporter=InMemorySpanExporter(),
        set_global=False,
        instrument_langchain=False,
    )
    assert provider.resource.attributes["service.name"] == "support-bot"
    assert "openinference.project.name" not in provider.resource.attributes
    provider.shutdown()


@pytest.mark.parametrize("naming", [True, False])
def test_spans_reach_the_exporter_with_langgraph_agent_names(naming: bool) -> None:
    exporter = InMemorySpanExporter()
    provider = configure_tracing(
        agent_name="orchestrator",
        exporter=exporter,
        set_global=False,
        instrument_langchain=False,
        name_langgraph_agents=naming,
    )
    with provider.get_tracer("test").start_as_current_span("writer") as span:
        span.set_attribute("metadata", json.dumps({"langgraph_node": "writer"}))
    assert provider.force_flush()
    [finished] = exporter.get_finished_spans()
    assert finished.attributes is not None
    assert finished.attributes.get("agent.name") == ("writer" if naming else None)
    provider.shutdown()


def test_settings_come_from_the_workers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka-1:9092,kafka-2:9092")
    monkeypatch.setenv("PROCESSOR_SPANS_TOPIC", "team.spans")
    settings = PublisherSettings()
    assert settings.kafka_bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert settings.spans_topic == "team.spans"


def test_topic_defaults_to_otlp_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROCESSOR_SPANS_TOPIC", raising=False)
    assert PublisherSettings().spans_topic == "otlp_spans"


def test_a_malformed_bootstrap_setting_stops_setup_with_what_to_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka-without-port")
    with pytest.raises(ConfigurationError, match="KAFKA_BOOTSTRAP_SERVERS"):
        configure_tracing(agent_name="a", set_global=False, instrument_langchain=False)


def test_agent_name_is_required() -> None:
    with pytest.raises(ValueError, match="agent_name"):
        configure_tracing(agent_name="", exporter=InMemorySpanExporter(), set_global=False)


@pytest.mark.usefixtures("clean_global_provider")
def test_configure_then_the_usual_instrument_call_traces_langchain(langchain: type) -> None:
    exporter = InMemorySpanExporter()
    provider = configure_tracing(
        agent_name="orchestrator", exporter=exporter, instrument_langchain=False
    )
    langchain().instrument()  # the usual call, no provider given: the global one
    run_a_chain()
    provider.force_flush()
    assert {span.name for span in exporter.get_finished_spans()} >= {"RunnableSequence"}
    provider.shutdown()


@pytest.mark.usefixtures("clean_global_provider")
def test_instrument_first_then_configure_still_traces_langchain(langchain: type) -> None:
    langchain().instrument()  # before any provider exists: OpenInference gets the proxy
    exporter = InMemorySpanExporter()
    provider = configure_tracing(agent_name="orchestrator", exporter=exporter)
    run_a_chain()
    provider.force_flush()
    assert {span.name for span in exporter.get_finished_spans()} >= {"RunnableSequence"}
    provider.shutdown()


@pytest.mark.usefixtures("clean_global_provider")
def test_configure_instruments_langchain_itself(langchain: type) -> None:
    exporter = InMemorySpanExporter()
    provider = configure_tracing(agent_name="orchestrator", exporter=exporter)
    run_a_chain()
    provider.force_flush()
    spans = exporter.get_finished_spans()
    assert {span.name for span in spans} >= {"RunnableSequence"}
    assert all(span.resource.attributes["service.name"] == "orchestrator" for span in spans)
    provider.shutdown()
