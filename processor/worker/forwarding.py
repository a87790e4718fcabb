"""Batch kept spans per Phoenix project and send them in the background, bounded in flight."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from opentelemetry.proto.trace.v1.trace_pb2 import Span

from processor.core.spans import SpanOrigin, SpanRecord
from processor.sinks.phoenix import ExportResult, PhoenixExporter

log = logging.getLogger(__name__)

FailureHandler = Callable[[list[tuple[SpanOrigin, Span]], ExportResult], Awaitable[None]]


class SpanForwarder:
    def __init__(
        self,
        exporter: PhoenixExporter,
        *,
        default_project: str,
        batch_spans: int,
        max_in_flight: int = 4,
        on_failure: FailureHandler | None = None,
    ) -> None:
        self._exporter = exporter
        self._default_project = default_project
        self._batch_spans = batch_spans
        self._buffers: dict[str, list[tuple[SpanOrigin, Span]]] = {}
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_failure = on_failure
        self.sent_spans = 0
        self.failed_spans = 0

    async def add(self, spans: Iterable[SpanRecord]) -> None:
        """Buffer spans; a full batch is sent (waiting here when too many are in flight)."""
        for span in spans:
            project = span.origin.project or self._default_project
            buffer = self._buffers.setdefault(project, [])
            buffer.append((span.origin, span.pb))
            if len(buffer) >= self._batch_spans:
                await self._send(project)

    async def flush(self) -> None:
        """Send every buffered span (called on a timer and at shutdown)."""
        for project in list(self._buffers):
            if self._buffers[project]:
                await self._send(project)

    async def drain(self, timeout_s: float) -> None:
        await self.flush()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def _send(self, project: str) -> None:
        batch = self._buffers.pop(project)
        # Backpressure: while Phoenix is slow, the consumer waits here instead of buffering.
        await self._in_flight.acquire()
        task = asyncio.create_task(self._export(project, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _export(self, project: str, batch: list[tuple[SpanOrigin, Span]]) -> None:
        try:
            result = await self._exporter.export(batch, project=project)
        finally:
            self._in_flight.release()
        if result.ok:
            self.sent_spans += len(batch)
            return
        self.failed_spans += len(batch)
        log.error("phoenix refused %d spans: HTTP %s %s", len(batch), result.status, result.detail)
        if self._on_failure is not None:
            await self._on_failure(batch, result)
