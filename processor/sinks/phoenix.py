"""Send spans to Phoenix over OTLP/HTTP protobuf.

``PhoenixExporter.export`` posts one batch (gzip, ``/v1/traces``) and retries what the
environment causes: 503 (Phoenix's queue is full), 429, other 5xx and connection errors, with
exponential backoff, jitter and ``Retry-After``. A 4xx other than 429 is the request's fault and
comes back as a permanent failure carrying the status and an excerpt of the body; a rejected
API key (401/403) says so. The exporter returns a result instead of raising, like the
OpenTelemetry SDK's exporters.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from pydantic import SecretStr

from processor.core.spans import SpanOrigin
from processor.sinks.otlp_batch import build_request

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
PROJECT_HEADER = "x-project-name"


@dataclass(slots=True, frozen=True)
class ExportResult:
    ok: bool
    status: int | None = None
    detail: str = ""
    attempts: int = 1


class PhoenixExporter:
    def __init__(
        self,
        *,
        traces_url: str,
        api_key: SecretStr | None = None,
        timeout_s: float = 30.0,
        max_attempts: int = 8,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._url = traces_url
        self._max_attempts = max_attempts
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        headers = {"content-type": "application/x-protobuf", "content-encoding": "gzip"}
        if api_key is not None:
            headers["authorization"] = f"Bearer {api_key.get_secret_value()}"
        self._client = client or httpx.AsyncClient(
            timeout=timeout_s, headers=headers, transport=httpx.AsyncHTTPTransport(retries=2)
        )
        if client is not None:
            self._client.headers.update(headers)

    async def export(
        self, items: Sequence[tuple[SpanOrigin, Span]], *, project: str | None = None
    ) -> ExportResult:
        body = gzip.compress(build_request(items).SerializeToString(), compresslevel=1)
        headers = {PROJECT_HEADER: project} if project else None
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            try:
                response = await self._client.post(self._url, content=body, headers=headers)
            except httpx.TransportError as exc:
                detail = f"{type(exc).__name__}: {exc}"
                status = None
            else:
                status = response.status_code
                if status < 300:
                    return ExportResult(True, status, attempts=attempt)
                detail = response.text[:300]
                if status not in RETRYABLE_STATUS:
                    if status in (401, 403):
                        detail = (
                            f"Phoenix rejected the API key (HTTP {status}); check PHOENIX_API_KEY"
                        )
                    return ExportResult(False, status, detail, attempt)
                retry_after = _retry_after_s(response)
            if attempt >= self._max_attempts:
                return ExportResult(
                    False, status, f"gave up after {attempt} attempts: {detail}", attempt
                )
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            log.warning(
                "phoenix export attempt %d failed (%s); retrying in %.1fs",
                attempt,
                status or detail,
                delay,
            )
            await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self._backoff_max_s, self._backoff_base_s * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)  # "equal jitter"

    async def shutdown(self) -> None:
        await self._client.aclose()


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, min(float(value), 60.0))
    except ValueError:
        return None
