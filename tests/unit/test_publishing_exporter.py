"""``KafkaSpanExporter`` without a broker: failures come back as results, never as exceptions.

What a user relies on: an agent whose Kafka is down keeps running; the export says FAILURE
within its timeout instead of raising or hanging; shutdown is prompt and final; bad settings
are refused when the exporter is made. Delivery to a real broker is covered by
``tests/integration/test_publishing.py``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from processor.publishing.kafka_exporter import KafkaSpanExporter


def closed_port() -> int:
    """A local port nobody listens on: connections are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def some_spans(count: int) -> list[ReadableSpan]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    for index in range(count):
        with provider.get_tracer("test").start_as_current_span(f"span-{index}"):
            pass
    provider.shutdown()
    return list(exporter.get_finished_spans())


@pytest.fixture
def unreachable() -> Iterator[KafkaSpanExporter]:
    exporter = KafkaSpanExporter(
        bootstrap_servers=f"127.0.0.1:{closed_port()}", topic="spans", export_timeout_s=3.0
    )
    try:
        yield exporter
    finally:
        exporter.shutdown(timeout_millis=2_000)


def test_export_to_an_unreachable_broker_fails_within_its_timeout(
    unreachable: KafkaSpanExporter,
) -> None:
    started = time.monotonic()
    result = unreachable.export(some_spans(3))
    assert result is SpanExportResult.FAILURE
    assert time.monotonic() - started < 3.0 + 2.5
    assert unreachable.stats.failed_spans == 3
    assert unreachable.stats.exported_spans == 0
    # The next export tries again (a broker may come back) and fails the same way.
    assert unreachable.export(some_spans(1)) is SpanExportResult.FAILURE
    assert unreachable.stats.failed_spans == 4


def test_export_after_shutdown_fails_and_shutdown_is_idempotent(
    unreachable: KafkaSpanExporter,
) -> None:
    unreachable.export(some_spans(1))
    started = time.monotonic()
    unreachable.shutdown(timeout_millis=2_000)
    unreachable.shutdown()
    assert time.monotonic() - started < 5.0
    assert unreachable.export(some_spans(2)) is SpanExportResult.FAILURE
    assert not [t for t in threading.enumerate() if t.name == "KafkaSpanExporter" and t.is_alive()]


def test_force_flush_with_nothing_pending_is_true(unreachable: KafkaSpanExporter) -> None:
    assert unreachable.force_flush(timeout_millis=1_000)


def test_an_empty_batch_succeeds_without_touching_kafka(unreachable: KafkaSpanExporter) -> None:
    assert unreachable.export([]) is SpanExportResult.SUCCESS
    assert not [t for t in threading.enumerate() if t.name == "KafkaSpanExporter"]


def test_spans_too_large_for_a_message_are_reported_not_sent(
    unreachable: KafkaSpanExporter,
) -> None:
    exporter = KafkaSpanExporter(
        bootstrap_servers=unreachable.bootstrap_servers, max_message_bytes=10
    )
    try:
        assert exporter.export(some_spans(2)) is SpanExportResult.FAILURE
        assert exporter.stats.failed_spans == 2
    finally:
        exporter.shutdown()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bootstrap_servers": " "}, "bootstrap_servers"),
        ({"topic": ""}, "topic"),
        ({"max_message_bytes": 0}, "max_message_bytes"),
        ({"max_message_bytes": 2_000, "max_buffer_bytes": 1_000}, "max_buffer_bytes"),
        ({"export_timeout_s": 0}, "export_timeout_s"),
    ],
)
def test_bad_settings_are_refused_when_made(kwargs: dict[str, object], message: str) -> None:
    settings: dict[str, object] = {"bootstrap_servers": "127.0.0.1:9092", **kwargs}
    with pytest.raises(ValueError, match=message):
        KafkaSpanExporter(**settings)  # type: ignore[arg-type]
