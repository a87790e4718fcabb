"""Send OTLP span batches to Phoenix over HTTP (protobuf, gzip, ``POST /v1/traces``).

``PhoenixExporter.send`` makes exactly one attempt and says what it means, as a value (like the
OpenTelemetry SDK's exporters, it never raises for a failed export):

- ``ACCEPTED``: 2xx. Phoenix has queued the spans; it ignores a span id it already holds, so a
  batch sent twice is stored once.
- ``RETRY``: the environment's fault, worth trying again later: a connection error or timeout,
  408, 429 and every 5xx (503 is Phoenix's "span queue full", 507 its "storage full").
  ``retry_after_s`` carries the server's ``Retry-After`` when it sent one.
- ``UNAUTHORIZED``: 401/403, Phoenix refused the API key (or its role). Retrying the same
  request cannot help until someone fixes the key, but the spans are not at fault either.
- ``REJECTED``: any other 4xx (415, 422, ...): the request's fault, never worth retrying.

A 2xx only means Phoenix *queued* the spans in memory: it writes them to its database a moment
later, and a Phoenix that stops drains its queue for a few seconds only, then drops the rest
(a crash drops all of it). ``stored_span_ids`` asks Phoenix (GraphQL ``getSpanByOtelId``, which
finds a span whatever its project) which spans it has actually written; Phoenix writes its
queue in order, so a batch whose last span is written is written (``EncodedBatch.last_span_id``).
``StoreConfirmer`` turns those answers into a verdict per batch: written, or to be sent again.

``RetryPolicy`` is the pure backoff rule (exponential, jittered, honouring ``Retry-After``); the
retry loop itself lives with the caller (``processor.worker.phoenix_delivery``), which decides
what to do with the spans while it waits.

The API key is sent as ``Authorization: Bearer <key>`` and appears in no log line, error or repr.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import gzip
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import httpx
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from pydantic import SecretStr

from processor.core.spans import SpanOrigin
from processor.sinks.otlp_batch import build_request

PROJECT_HEADER = "x-project-name"
BODY_EXCERPT_CHARS = 500
MAX_RETRY_AFTER_S = 300.0
_GZIP_LEVEL = 1  # ~4x smaller at a few ms per thousand spans; higher levels cost 3-4x the CPU


class ExportOutcome(enum.Enum):
    ACCEPTED = "accepted"
    RETRY = "retry"
    UNAUTHORIZED = "unauthorized"
    REJECTED = "rejected"


@dataclass(slots=True, frozen=True)
class ExportResult:
    """What one attempt came to. ``status`` is the HTTP status (None: no answer at all);
    ``detail`` is an excerpt of Phoenix's answer or the connection error, for people."""

    outcome: ExportOutcome
    status: int | None = None
    detail: str = ""
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is ExportOutcome.ACCEPTED


@dataclass(slots=True, frozen=True)
class EncodedBatch:
    """A gzip-compressed export request, and the hex id of the span Phoenix queues last."""

    body: bytes
    last_span_id: str
    first_span_id: str


@dataclass(slots=True, frozen=True)
class StoredCheck:
    """The answer to "which of these spans has Phoenix written?". ``found`` is meaningful only
    when ``result.ok``; otherwise ``result`` says why the question could not be answered."""

    found: frozenset[str]
    result: ExportResult


def outcome_of(status: int) -> ExportOutcome:
    """How an HTTP status from ``/v1/traces`` is handled."""
    if 200 <= status < 300:
        return ExportOutcome.ACCEPTED
    if status in (401, 403):
        return ExportOutcome.UNAUTHORIZED
    if status in (408, 429) or 500 <= status < 600:
        return ExportOutcome.RETRY
    return ExportOutcome.REJECTED


@dataclass(slots=True, frozen=True)
class RetryPolicy:
    """Exponential backoff with "equal jitter": attempt ``n`` waits a random time in
    ``[d/2, d]`` where ``d = min(max_s, initial_s * multiplier**(n-1))``. A ``Retry-After`` from
    the server is honoured (never waiting less), capped at ``MAX_RETRY_AFTER_S``."""

    initial_s: float = 0.25
    max_s: float = 10.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not self.initial_s > 0:
            raise ValueError(f"initial_s must be > 0, got {self.initial_s}")
        if self.max_s < self.initial_s:
            raise ValueError(f"max_s ({self.max_s}) must be >= initial_s ({self.initial_s})")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")

    def delay_s(
        self, attempt: int, retry_after_s: float | None = None, *, rng: random.Random
    ) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1 for the first)."""
        if attempt < 1:
            raise ValueError(f"attempt counts from 1, got {attempt}")
        # Capping the exponent keeps the float finite however long an outage lasts.
        ceiling = min(self.max_s, self.initial_s * self.multiplier ** min(attempt - 1, 64))
        backoff = rng.uniform(ceiling / 2, ceiling)
        if retry_after_s is None:
            return backoff
        # The server's hint plus a little spread, so that many waiting batches do not return at
        # the same instant.
        return min(retry_after_s, MAX_RETRY_AFTER_S) + rng.uniform(0, self.initial_s)


class PhoenixExporter:
    """One Phoenix endpoint and its HTTP connection pool.

    ``transport`` replaces the network (tests of the retry policy use ``httpx.MockTransport``);
    ``max_connections`` should be at least the number of requests the caller keeps in flight.
    """

    def __init__(
        self,
        *,
        traces_url: str,
        api_key: SecretStr | None = None,
        timeout_s: float = 30.0,
        max_connections: int = 8,
        transport: httpx.AsyncBaseTransport | None = None,
        wall_clock_s: Callable[[], float] = time.time,
    ) -> None:
        if not traces_url.startswith(("http://", "https://")):
            raise ValueError(f"traces_url must be an http(s):// URL, got {traces_url!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self.traces_url = traces_url
        base = traces_url.removesuffix("/").removesuffix("/v1/traces")
        self.graphql_url = f"{base}/graphql"
        self.has_api_key = api_key is not None and bool(api_key.get_secret_value())
        self._wall_clock_s = wall_clock_s
        headers = {}
        if api_key is not None and self.has_api_key:
            headers["authorization"] = f"Bearer {api_key.get_secret_value()}"
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        # No retries in the transport: every retry goes through the caller's policy.
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=limits,
            transport=transport or httpx.AsyncHTTPTransport(limits=limits),
        )

    def __repr__(self) -> str:
        return (
            f"PhoenixExporter({self.traces_url!r}, api_key={'set' if self.has_api_key else None})"
        )

    @staticmethod
    def encode(items: Sequence[tuple[SpanOrigin, Span]]) -> bytes:
        """The gzip-compressed ``ExportTraceServiceRequest`` holding ``items``."""
        return gzip.compress(build_request(items).SerializeToString(), compresslevel=_GZIP_LEVEL)

    @staticmethod
    async def encode_batch(items: Sequence[tuple[SpanOrigin, Span]]) -> EncodedBatch:
        """``encode``, with the compression (which releases the GIL) off the event loop."""
        request = build_request(items)
        # Phoenix queues a request's spans in request order; build_request groups by origin,
        # so the last span queued is the last of the last group, not necessarily items[-1].
        spans = request.resource_spans
        last = spans[-1].scope_spans[-1].spans[-1].span_id.hex() if items else ""
        first = spans[0].scope_spans[0].spans[0].span_id.hex() if items else ""
        raw = request.SerializeToString()
        body = await asyncio.to_thread(gzip.compress, raw, _GZIP_LEVEL)
        return EncodedBatch(body, last, first)

    async def send(self, body: bytes, *, project: str | None = None) -> ExportResult:
        """POST one encoded batch once. ``project`` goes into the ``x-project-name`` header,
        which Phoenix prefers to the resources' ``openinference.project.name``."""
        headers = {"content-type": "application/x-protobuf", "content-encoding": "gzip"}
        if project is not None:
            headers[PROJECT_HEADER] = project
        try:
            response = await self._client.post(self.traces_url, content=body, headers=headers)
        except httpx.TransportError as exc:  # refused, reset, timed out: the environment's
            return ExportResult(
                ExportOutcome.RETRY, None, f"{type(exc).__name__}: {exc}".rstrip(": ")
            )
        status = response.status_code
        outcome = outcome_of(status)
        if outcome is ExportOutcome.ACCEPTED:
            return ExportResult(outcome, status)
        return ExportResult(
            outcome,
            status,
            _excerpt(response.text),
            retry_after_s(response.headers.get("retry-after"), now_s=self._wall_clock_s()),
        )

    async def stored_span_ids(self, span_ids: Sequence[str]) -> StoredCheck:
        """Which of ``span_ids`` (hex) Phoenix has written to its database, in any project."""
        if not span_ids:
            return StoredCheck(frozenset(), ExportResult(ExportOutcome.ACCEPTED, 200))
        names = [f"s{i}" for i in range(len(span_ids))]
        query = "query({}) {{ {} }}".format(
            ", ".join(f"${n}: String!" for n in names),
            " ".join(f"{n}: getSpanByOtelId(spanId: ${n}) {{ id }}" for n in names),
        )
        payload = {"query": query, "variables": dict(zip(names, span_ids, strict=True))}
        try:
            response = await self._client.post(self.graphql_url, json=payload)
        except httpx.TransportError as exc:
            detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
            return StoredCheck(frozenset(), ExportResult(ExportOutcome.RETRY, None, detail))
        status = response.status_code
        outcome = outcome_of(status)
        if outcome is not ExportOutcome.ACCEPTED:
            return StoredCheck(frozenset(), ExportResult(outcome, status, _excerpt(response.text)))
        try:
            body = response.json()
            data = body.get("data") or {}
            errors = body.get("errors")
        except (ValueError, AttributeError):
            errors, data = [{"message": _excerpt(response.text)}], {}
        if errors:
            # This Phoenix cannot answer the question (too old, or not Phoenix at all).
            detail = _excerpt(str(errors))
            return StoredCheck(frozenset(), ExportResult(ExportOutcome.REJECTED, status, detail))
        found = frozenset(
            span_id for name, span_id in zip(names, span_ids, strict=True) if data.get(name)
        )
        return StoredCheck(found, ExportResult(ExportOutcome.ACCEPTED, status))

    async def probe(self) -> ExportResult:
        """Send an empty export request: tells whether Phoenix is up and takes our API key,
        without storing anything."""
        return await self.send(self.encode(()))

    async def shutdown(self) -> None:
        await self._client.aclose()


def retry_after_s(value: str | None, *, now_s: float) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date); None when absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now_s)


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= BODY_EXCERPT_CHARS else text[:BODY_EXCERPT_CHARS] + "..."


class StoreVerdict(enum.Enum):
    STORED = "stored"
    LOST = "lost"  # Phoenix went away with the span in its queue and came back without it
    OVERTAKEN = "overtaken"  # spans accepted well after it are written, it is not
    STALLED = "stalled"  # Phoenix answered, but wrote none of the spans waited for, for too long
    UNSUPPORTED = "unsupported"  # this Phoenix cannot say: trust its 2xx


@dataclass(slots=True, eq=False)
class _Waiter:
    span_id: str  # the batch's last span: written means the batch is written
    first_span_id: str | None  # written means Phoenix has started on the batch: progress
    since: float  # when Phoenix accepted the batch
    future: asyncio.Future[StoreVerdict]
    suspect: bool = False  # waiting while a poll got no answer: Phoenix may have lost its queue


class StoreConfirmer:
    """Waits until Phoenix has written given spans (each the last span of a batch).

    One polling task asks about every span waited for, in one query per ``max_ids_per_query``,
    every ``interval_s`` (backing off while Phoenix does not answer). Phoenix writes its queue
    in order, which gives three ways to tell that a batch will not be written, all of which
    mean "send it again":

    - ``LOST``: a poll got no answer while the span waited (Phoenix restarting, say), and once
      Phoenix answers again the span is not written: the queue it sat in is gone.
    - ``OVERTAKEN``: a span accepted more than ``overtake_grace_s`` later is written, this one
      is not (its batch was dropped, or Phoenix cannot write that span).
    - ``STALLED``: Phoenix answered polls for ``stall_timeout_s`` and wrote none of the spans
      asked about (the first and last span of each batch waited for). Time while Phoenix does
      not answer does not count, and neither does a slow Phoenix that keeps writing: a long
      queue is not a lost one.
    """

    def __init__(
        self,
        exporter: PhoenixExporter,
        *,
        interval_s: float = 0.2,
        stall_timeout_s: float = 120.0,
        overtake_grace_s: float = 10.0,
        max_ids_per_query: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        if not stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {stall_timeout_s}")
        if overtake_grace_s < 0:
            raise ValueError(f"overtake_grace_s must be >= 0, got {overtake_grace_s}")
        self._exporter = exporter
        self._interval_s = interval_s
        self._stall_timeout_s = stall_timeout_s
        self._overtake_grace_s = overtake_grace_s
        self._max_ids = max_ids_per_query
        self._clock = clock
        self._waiters: list[_Waiter] = []
        self._newest_stored_since = -math.inf  # acceptance time of the newest batch written
        self._progress_at = clock()  # last time a waited-for span was written (or no answer)
        self._poller: asyncio.Task[None] | None = None
        self.unanswered_polls = 0
        self.unsupported: str | None = None  # why, once Phoenix could not answer at all

    async def wait(self, span_id: str, first_span_id: str | None = None) -> StoreVerdict:
        """Until the batch accepted just now, whose last span (hex) is ``span_id``, is written,
        or will not be. Its first span, when given, tells early that Phoenix is on it."""
        if self.unsupported is not None:
            return StoreVerdict.UNSUPPORTED
        now = self._clock()
        if not self._waiters:
            self._progress_at = now  # the stall clock runs only while something waits
        waiter = _Waiter(span_id, first_span_id, now, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="phoenix-store-confirmer")
        try:
            return await waiter.future
        finally:
            self._waiters.remove(waiter)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)

    async def _poll(self) -> None:
        interval_s = self._interval_s
        while self._waiters:
            await asyncio.sleep(interval_s)
            span_ids = list(dict.fromkeys(self._asked()))
            answered = True
            for start in range(0, len(span_ids), self._max_ids):
                answered = await self._check(span_ids[start : start + self._max_ids])
                if not answered:
                    break
            if answered:
                self._judge_the_rest()
            # Ask a Phoenix that does not answer less and less often (up to 16 intervals).
            interval_s = (
                self._interval_s if answered else min(interval_s * 2, 16 * self._interval_s)
            )

    def _asked(self) -> Iterator[str]:
        for waiter in self._waiters:
            if not waiter.future.done():
                yield waiter.span_id
                if waiter.first_span_id:
                    yield waiter.first_span_id

    async def _check(self, span_ids: list[str]) -> bool:
        check = await self._exporter.stored_span_ids(span_ids)
        outcome = check.result.outcome
        if outcome in (ExportOutcome.RETRY, ExportOutcome.UNAUTHORIZED):
            self.unanswered_polls += 1
            self._progress_at = self._clock()  # not Phoenix's stall: it does not answer
            if outcome is ExportOutcome.RETRY:
                for waiter in self._waiters:
                    waiter.suspect = True
            return False
        if outcome is ExportOutcome.REJECTED:
            self.unsupported = _describe_result(check.result)
            for waiter in self._waiters:
                _settle(waiter, StoreVerdict.UNSUPPORTED)
            return False
        asked = set(span_ids)
        for waiter in self._waiters:
            if waiter.first_span_id in check.found:
                waiter.first_span_id = None  # Phoenix is on this batch: no need to ask again
                self._progress_at = self._clock()
            if waiter.span_id not in asked or waiter.future.done():
                continue
            if waiter.span_id in check.found:
                self._newest_stored_since = max(self._newest_stored_since, waiter.since)
                self._progress_at = self._clock()
                _settle(waiter, StoreVerdict.STORED)
            elif waiter.suspect:
                _settle(waiter, StoreVerdict.LOST)
        return True

    def _judge_the_rest(self) -> None:
        stalled = self._clock() - self._progress_at > self._stall_timeout_s
        for waiter in self._waiters:
            if waiter.future.done():
                continue
            if waiter.since + self._overtake_grace_s < self._newest_stored_since:
                _settle(waiter, StoreVerdict.OVERTAKEN)
            elif stalled:
                _settle(waiter, StoreVerdict.STALLED)
        if stalled:
            self._progress_at = self._clock()


def _settle(waiter: _Waiter, verdict: StoreVerdict) -> None:
    if not waiter.future.done():
        waiter.future.set_result(verdict)


def _describe_result(result: ExportResult) -> str:
    status = f"HTTP {result.status}" if result.status is not None else "no answer"
    return f"{status}: {result.detail}" if result.detail else status
