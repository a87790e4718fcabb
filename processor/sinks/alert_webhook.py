"""POST alert events (``schemas/alert.schema.json``) to a webhook, without ever holding back
the caller.

The alerts topic is the durable record of alert events; the webhook is the one that wakes
people up, so it must never slow finalize, which produces them. ``AlertWebhook.offer`` only
appends the event to a bounded in-memory queue (from any thread), and ``run``, a task of the
worker's event loop, sends the queue one event at a time.

Why one at a time, in order: a receiver must see a series' ``firing`` before its
``resolved``, and the usual receivers rate-limit a webhook (Slack: about one message a
second), so sending in parallel would only earn 429s. The HTTP status says what to do with
an event:

- 2xx: delivered.
- No answer (connection refused or reset, timeout), 408, 429 and every 5xx: the receiver's
  environment, not the event. The same event is sent again, with ``RetryPolicy``'s capped,
  jittered exponential backoff (a ``Retry-After`` is honoured), until it is delivered, and
  the events behind it wait. An alert delivered late is still worth having; if a copy sent
  while an answer got lost arrives twice, the receiver drops it by its ``key``.
- Any other status (400, 403, 404, 410: a Slack webhook revoked or its channel archived; a
  3xx, as redirects are not followed because they would turn the POST into a GET): the
  receiver refuses this body. It never will take it, so retrying would block every alert
  behind it forever. The event is dropped and counted in ``rejected``.

Bounded, and the oldest goes: while the receiver is down, events pile up at most
``max_queue`` (plus the one being retried), and when the queue is full the oldest waiting
event is dropped (counted in ``dropped``). The newest state of a series is the one that
matters by the time the receiver is back. The queue lives in memory: events queued when the
worker stops are not sent, but they are in the alerts topic.

The log tells state changes, not attempts: one WARNING when delivery starts failing (with the
reason), one INFO when the receiver answers again ("after N s and M failed attempts").
Refused events and drops get at most one line per ``LOG_EVERY_S`` each, with their total so
far.

The URL stays out of the log. A webhook URL is usually its own credential (Slack's path
is), so log lines, errors and the repr show only ``scheme://host[:port]/…`` (``target``).

Bodies: ``json`` is the event itself; ``slack`` is ``{"text": ...}`` with a one-line
summary in Slack's mrkdwn (``slack_text``), which Slack's incoming webhooks take, and also
Mattermost's, Rocket.Chat's and many others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, get_args

import httpx
import orjson

from processor.sinks.phoenix import RetryPolicy, retry_after_s

log = logging.getLogger(__name__)

BodyFormat = Literal["json", "slack"]
BODY_FORMATS: tuple[str, ...] = get_args(BodyFormat)
URL_SETTING = "PROCESSOR_ALERT_WEBHOOK_URL"
FORMAT_SETTING = "PROCESSOR_ALERT_WEBHOOK_FORMAT"
LOG_EVERY_S = 60.0  # refused and dropped events: one line a minute at most
BODY_EXCERPT_CHARS = 300
FIRING_ICON = ":rotating_light:"
RESOLVED_ICON = ":white_check_mark:"
RANGE_DASH = "\u2013"  # en dash, between a window's start and end
_HEADERS = {"content-type": "application/json"}

Outcome = Literal["delivered", "retry", "rejected"]


def outcome_of(status: int) -> Outcome:
    """How an HTTP status from the webhook is handled (see the module docstring)."""
    if 200 <= status < 300:
        return "delivered"
    if status in (408, 429) or 500 <= status < 600:
        return "retry"
    return "rejected"


def redacted_url(url: str) -> str:
    """``scheme://host[:port]/…``, the most of a webhook URL a log may show. Raises a
    ValueError naming the setting to fix when ``url`` is not an http(s) URL with a host."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"{URL_SETTING} is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        got = f"scheme {parsed.scheme!r}" if parsed.scheme else "no scheme"
        raise ValueError(f"{URL_SETTING} must be an http:// or https:// URL, got one with {got}")
    if not parsed.host:
        raise ValueError(f"{URL_SETTING} must name a host, as in https://host/path")
    hidden = "/…" if parsed.path not in ("", "/") or parsed.query else ""
    return f"{parsed.scheme}://{parsed.netloc.decode('ascii')}{hidden}"


def encode_body(event: Mapping[str, Any], body_format: BodyFormat) -> bytes:
    """The request body for ``event``. TypeError when the event is not JSON-serialisable."""
    if body_format == "slack":
        return orjson.dumps({"text": slack_text(event)})
    return orjson.dumps(event, default=_plain)


def slack_text(event: Mapping[str, Any]) -> str:
    """One line for people, in Slack's mrkdwn, e.g. ``:rotating_light: [warning] error-rate
    firing for coder (model=gpt-4o): error_rate 0.12 &gt; 0.05 in window
    2024-12-04T08:13:20Z-08:14:20Z <http://…/redirects/traces/…|trace in Phoenix>`` (the
    window's ends joined by an en dash).

    ``&``, ``<`` and ``>`` are escaped as Slack asks (it shows them as typed). The link is
    the first exemplar's with a Phoenix URL (failed traces come first, then the slowest)."""
    firing = event.get("state") == "firing"
    series = _escape(str(event.get("agent", "?")))
    dimensions = event.get("dimensions") or {}
    if dimensions:
        pairs = ", ".join(f"{name}={value}" for name, value in dimensions.items())
        series += f" ({_escape(pairs)})"
    metric, op = event.get("metric", "?"), event.get("op", "?")
    value, threshold = event.get("value"), _number(event.get("threshold"))
    if firing:
        shown = "" if value is None else f" {_number(value)}"
        condition = f"{metric}{shown} {op} {threshold}"
    elif value is None:
        condition = f"{metric} no longer {op} {threshold}"
    else:
        condition = f"{metric} {_number(value)}, no longer {op} {threshold}"
    text = (
        f"{FIRING_ICON if firing else RESOLVED_ICON} [{_escape(str(event.get('severity', '?')))}]"
        f" {_escape(str(event.get('rule', '?')))} {_escape(str(event.get('state', '?')))}"
        f" for {series}: {_escape(condition)} in window {_window(event)}"
    )
    for exemplar in event.get("exemplars") or ():
        url = exemplar.get("phoenix_url") if isinstance(exemplar, Mapping) else None
        if isinstance(url, str) and url and not any(c in url for c in "<>| \t\n"):
            return f"{text} <{url}|trace in Phoenix>"
    return text


@dataclass(slots=True, frozen=True)
class _Queued:
    key: str  # for log lines
    body: bytes


@dataclass(slots=True, frozen=True)
class _Attempt:
    outcome: Outcome
    reason: str = ""  # for people: "HTTP 503: <excerpt>", "ConnectError: ..."
    retry_after_s: float | None = None


@dataclass(slots=True)
class _Throttle:
    """Says whether a recurring line may be logged now: once per ``every_s``."""

    every_s: float
    logged_at: float | None = None

    def due(self, now: float) -> bool:
        if self.logged_at is not None and now - self.logged_at < self.every_s:
            return False
        self.logged_at = now
        return True


class AlertWebhook:
    """Delivers alert events to one webhook, in order, retrying as the module says.

    ``offer`` may be called from any thread, and before ``run`` starts (the events wait).
    ``run`` is the delivery loop, for one task: it ends when cancelled (the event being
    delivered goes back to the front of the queue) or after ``close``.

    Counters: ``delivered``, ``failed_attempts`` (attempts that will be retried),
    ``rejected`` (events the receiver refused, or that could not be encoded), ``dropped``
    (events pushed out of a full queue). ``failing`` is True from a failed attempt until the
    receiver answers again; ``pending`` is the number of events not settled yet.
    """

    def __init__(
        self,
        url: str,
        *,
        body_format: BodyFormat = "json",
        timeout_s: float = 10.0,
        max_queue: int = 10_000,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
    ) -> None:
        self.target = redacted_url(url)
        if body_format not in BODY_FORMATS:
            raise ValueError(
                f"{FORMAT_SETTING} must be one of {', '.join(BODY_FORMATS)}, got {body_format!r}"
            )
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if not retry_initial_s > 0:
            raise ValueError(f"retry_initial_s must be > 0, got {retry_initial_s}")
        if retry_max_s < retry_initial_s:
            raise ValueError(
                f"retry_max_s ({retry_max_s}) must be >= retry_initial_s ({retry_initial_s})"
            )
        self.body_format: BodyFormat = body_format
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._url = url
        self._retry = RetryPolicy(initial_s=retry_initial_s, max_s=retry_max_s)
        self._rng = random.Random()
        self._clock: Callable[[], float] = time.monotonic
        # One request at a time; no retries in the transport: every retry is ours.
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        self._client = httpx.AsyncClient(
            headers=_HEADERS, timeout=httpx.Timeout(timeout_s), limits=limits
        )
        # offer() may come from another thread: the queue and its counter under a lock.
        self._lock = threading.Lock()
        self._queue: deque[_Queued] = deque()
        self._current: _Queued | None = None
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._failing_since: float | None = None
        self._failed_before = 0  # failed_attempts when the current failure began
        self._refusals = _Throttle(LOG_EVERY_S)
        self._drops = _Throttle(LOG_EVERY_S)
        self.delivered = 0
        self.failed_attempts = 0
        self.rejected = 0
        self.dropped = 0

    def __repr__(self) -> str:
        return f"AlertWebhook({self.target!r}, body_format={self.body_format!r})"

    @property
    def failing(self) -> bool:
        """Whether the event at the front is being retried: the receiver does not answer."""
        return self._failing_since is not None

    @property
    def pending(self) -> int:
        """Events offered and neither delivered, refused nor dropped yet."""
        with self._lock:
            return len(self._queue) + (self._current is not None)

    # -- the caller's side ---------------------------------------------------------------

    def offer(self, event: Mapping[str, Any]) -> None:
        """Queue ``event`` for delivery and return at once. The body is encoded now, so the
        caller may reuse the mapping. A full queue drops its oldest waiting event."""
        key = str(event.get("key", "?"))
        try:
            item = _Queued(key, encode_body(event, self.body_format))
        except Exception as exc:  # not JSON-serialisable, malformed: never raise into the caller
            with self._lock:
                self.rejected += 1
            log.error("alert %s cannot be sent to the webhook, it is dropped: %s", key, exc)
            return
        with self._lock:
            full = len(self._queue) >= self.max_queue
            if full:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(item)
            say = full and self._drops.due(self._clock())
            dropped, waiting = self.dropped, len(self._queue)
        if say:
            log.warning(
                "alert webhook %s: the queue is full (%d alerts waiting), dropping the oldest "
                "(%d dropped so far)",
                self.target,
                waiting,
                dropped,
            )
        self._wake()

    def _wake(self) -> None:
        loop = self._loop
        if loop is None:  # run() has not started; it looks at the queue when it does
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wakeup.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to wake
                loop.call_soon_threadsafe(self._wakeup.set)

    # -- the delivery loop ---------------------------------------------------------------

    async def run(self) -> None:
        """Deliver the queue, one event at a time, until cancelled or closed."""
        if self._loop is not None:
            raise RuntimeError("AlertWebhook.run is already running: one task sends in order")
        # Before looking at the queue: an offer() from another thread that found no loop to
        # wake appended its event before this assignment, so _run's first look sees it.
        self._loop = asyncio.get_running_loop()
        try:
            await self._run()
        finally:
            self._loop = None

    async def _run(self) -> None:
        while not self._closed:
            with self._lock:
                item = self._queue.popleft() if self._queue else None
                self._current = item
            if item is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            settled = False
            try:
                settled = await self._deliver(item)
            finally:
                with self._lock:
                    if not settled:  # cancelled or closed: the event waits for the next run
                        self._queue.appendleft(item)
                    self._current = None

    async def close(self) -> None:
        """Stop delivering (``run`` returns) and close the HTTP client."""
        self._closed = True
        self._wakeup.set()
        await self._client.aclose()
        if waiting := self.pending:
            log.warning(
                "alert webhook %s closed with alerts not delivered (they are in the alerts "
                "topic): %d",
                self.target,
                waiting,
            )

    async def _deliver(self, item: _Queued) -> bool:
        """True once ``item`` is settled (delivered or refused); False if closed first."""
        attempt = 0
        while not self._closed:
            attempt += 1
            result = await self._attempt(item)
            if result.outcome == "retry":
                if self._closed:
                    break
                self._failed(result)
                delay = self._retry.delay_s(attempt, result.retry_after_s, rng=self._rng)
                await asyncio.sleep(delay)
                continue
            self._answered(result)
            if result.outcome == "delivered":
                self.delivered += 1
            else:
                self._refused(item, result)
            return True
        return False

    async def _attempt(self, item: _Queued) -> _Attempt:
        try:
            # httpx's timeout bounds each step (connect, each read...); this the whole request.
            async with asyncio.timeout(self.timeout_s):
                response = await self._client.post(self._url, content=item.body)
        except TimeoutError:
            return _Attempt("retry", f"no answer within {self.timeout_s:g} s")
        except httpx.RequestError as exc:  # refused, reset, timed out, protocol error
            return _Attempt("retry", self._hide(f"{type(exc).__name__}: {exc}".rstrip(": ")))
        except RuntimeError:
            if self._closed:  # the client was closed under the request
                return _Attempt("retry", "closed")
            raise
        status = response.status_code
        outcome = outcome_of(status)
        if outcome == "delivered":
            return _Attempt(outcome)
        reason = f"HTTP {status}"
        if 300 <= status < 400:
            reason += " (a redirect, not followed: set the URL it leads to)"
        elif excerpt := _excerpt(response.text):
            reason += f": {self._hide(excerpt)}"
        hint = retry_after_s(response.headers.get("retry-after"), now_s=time.time())
        return _Attempt(outcome, reason, hint)

    def _failed(self, result: _Attempt) -> None:
        self.failed_attempts += 1
        if self._failing_since is not None:
            return
        self._failing_since = self._clock()
        self._failed_before = self.failed_attempts - 1
        log.warning(
            "alert webhook %s is not accepting alerts (%s); holding them (%d waiting) and "
            "retrying with backoff, up to %g s apart",
            self.target,
            result.reason,
            self.pending,
            self._retry.max_s,
        )

    def _answered(self, result: _Attempt) -> None:
        since = self._failing_since
        if since is None:
            return
        self._failing_since = None
        log.info(
            "alert webhook %s %s again after %.1f s and %d failed attempts",
            self.target,
            "accepts alerts" if result.outcome == "delivered" else "answers",
            self._clock() - since,
            self.failed_attempts - self._failed_before,
        )

    def _refused(self, item: _Queued, result: _Attempt) -> None:
        with self._lock:
            self.rejected += 1
            refused = self.rejected
        if not self._refusals.due(self._clock()):
            return
        log.error(
            "alert webhook %s refused alert %s (%s); it is dropped, as this body will never "
            "be taken (check %s, and %s=%s); %d refused so far",
            self.target,
            item.key,
            result.reason,
            URL_SETTING,
            FORMAT_SETTING,
            self.body_format,
            refused,
        )

    def _hide(self, text: str) -> str:
        return text.replace(self._url, self.target)


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _number(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _window(event: Mapping[str, Any]) -> str:
    """``2024-12-04T08:13:20Z-08:14:20Z`` (an en dash): the end's date only when it differs."""
    start_ms, end_ms = event.get("window_start_ms"), event.get("window_end_ms")
    if not isinstance(start_ms, int) or not isinstance(end_ms, int):
        return _escape(
            f"{event.get('window_start', '?')}{RANGE_DASH}{event.get('window_end', '?')}"
        )
    start, end = _moment(start_ms), _moment(end_ms)
    same_day = start.date() == end.date()
    return f"{_iso(start, start_ms)}{RANGE_DASH}{_iso(end, end_ms, time_only=same_day)}"


def _moment(timestamp_ms: int) -> datetime:
    return datetime.fromtimestamp(timestamp_ms // 1000, tz=UTC)


def _iso(moment: datetime, timestamp_ms: int, *, time_only: bool = False) -> str:
    text = moment.strftime("%H:%M:%S" if time_only else "%Y-%m-%dT%H:%M:%S")
    if millis := timestamp_ms % 1000:
        text += f".{millis:03d}"
    return text + "Z"


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= BODY_EXCERPT_CHARS else text[:BODY_EXCERPT_CHARS] + "..."
