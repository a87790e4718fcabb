"""AlertWebhook against a real HTTP receiver on 127.0.0.1: order, bodies, retries, refusals,
outages and a full queue. Every sample event is valid per schemas/alert.schema.json."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from processor.sinks.alert_webhook import FORMAT_SETTING, URL_SETTING, AlertWebhook

SCHEMA = orjson.loads(
    (Path(__file__).resolve().parents[2] / "schemas" / "alert.schema.json").read_bytes()
)
VALIDATOR = jsonschema.Draft202012Validator(
    SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)
LOGGER = "processor.sinks.alert_webhook"
SECRET_PATH = "/services/T000/B000/SECRETTOKEN"
TRACE = "0af7651916cd43dd8448eb211c80319c"
PHOENIX_URL = f"http://127.0.0.1:6006/redirects/traces/{TRACE}"
START_MS = 1_733_300_000_000  # 2024-12-04T08:13:20Z
WINDOW_MS = 60_000
DASH = "\u2013"  # en dash


def fast(url: str, **options: Any) -> AlertWebhook:
    """A webhook whose retries come after 10-50 ms."""
    return AlertWebhook(url, retry_initial_s=0.01, retry_max_s=0.05, **options)


def _iso(timestamp_ms: int) -> str:
    moment = datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _event(n: int = 0, **changes: Any) -> dict[str, Any]:
    """The n-th window's error-rate alert of coder/gpt-4o, with ``changes``; schema-checked."""
    start = START_MS + n * WINDOW_MS
    event: dict[str, Any] = {
        "v": 1,
        "key": orjson.dumps(["error-rate", "coder", ["gpt-4o"], start]).decode(),
        "rule": "error-rate",
        "severity": "warning",
        "state": "firing",
        "agent": "coder",
        "dimensions": {"model": "gpt-4o"},
        "metric": "error_rate",
        "op": ">",
        "value": 0.12,
        "threshold": 0.05,
        "window_start_ms": start,
        "window_end_ms": start + WINDOW_MS,
        "window_start": _iso(start),
        "window_end": _iso(start + WINDOW_MS),
        "mlflow_run_id": "abc123",
        "exemplars": [{"trace_id": TRACE, "phoenix_url": PHOENIX_URL}],
    }
    event.update(changes)
    VALIDATOR.validate(event)
    return event


def _silent(n: int = 0) -> dict[str, Any]:
    return _event(
        n,
        key=orjson.dumps(["coder-silent", "coder", [], START_MS + n * WINDOW_MS]).decode(),
        rule="coder-silent",
        severity="critical",
        dimensions={},
        metric="spans",
        op="<",
        value=None,
        threshold=1,
        mlflow_run_id=None,
        exemplars=[],
    )


@dataclass(frozen=True)
class Request:
    path: str
    content_type: str
    body: bytes
    status: int

    @property
    def document(self) -> Any:
        return orjson.loads(self.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that timed out and went away: the reply fails, as it should


class Receiver:
    """A webhook receiver: answers each POST with the next of ``statuses``, then 200.

    The port is bound at once (so it stays ours) but only listened on after ``start()``:
    until then every connection is refused, as when nothing listens. ``hang`` requests are
    held until ``release`` is set."""

    def __init__(self, *, listening: bool = True) -> None:
        self.statuses: list[int] = []
        self.requests: list[Request] = []
        self.hang = 0
        self.entered = threading.Event()  # a held request has arrived
        self.release = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    held = receiver.hang > 0
                    receiver.hang -= held
                if held:
                    receiver.entered.set()
                    receiver.release.wait(10)
                with receiver._lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.requests.append(
                        Request(self.path, self.headers.get("content-type", ""), body, status)
                    )
                answer = b"ok" if status < 300 else f"refused with {status}".encode()
                self.send_response(status)
                if status == 429:
                    self.send_header("retry-after", "0")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = _Server(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self._server.server_bind()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}{SECRET_PATH}"
        self._thread: threading.Thread | None = None
        if listening:
            self.start()

    def start(self) -> None:
        self._server.server_activate()
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.release.set()
        if self._thread is not None:
            self._server.shutdown()
        self._server.server_close()

    def delivered(self) -> list[Any]:
        """The documents answered 2xx, in the order they arrived."""
        with self._lock:
            return [r.document for r in self.requests if 200 <= r.status < 300]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def down_receiver() -> Iterator[Receiver]:
    server = Receiver(listening=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Callable[[int], list[str]]:
    caplog.set_level(logging.INFO, logger=LOGGER)

    def at(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]

    return at


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for ``condition``; a guard against hanging, not a measure of speed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"still waiting for {what}")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running(hook: AlertWebhook) -> AsyncIterator[AlertWebhook]:
    task = asyncio.create_task(hook.run())
    try:
        yield hook
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await hook.close()


def test_events_arrive_in_order_with_the_event_as_json_body(receiver: Receiver) -> None:
    events = [
        _event(0),
        _event(1, state="resolved", value=0.01, exemplars=[]),
        _silent(2),
        _event(3, dimensions={}, mlflow_run_id=None, severity="info", op="<=", value=7),
        _event(4, exemplars=[{"trace_id": TRACE, "phoenix_url": None}]),
    ]

    async def scenario() -> AlertWebhook:
        async with running(fast(receiver.url)) as hook:
            for event in events:
                hook.offer(event)
            await until(lambda: hook.delivered == len(events), "every event")
            return hook

    hook = asyncio.run(scenario())
    assert receiver.delivered() == events
    assert {(r.path, r.content_type) for r in receiver.requests} == {
        (SECRET_PATH, "application/json")
    }
    assert (hook.failed_attempts, hook.rejected, hook.dropped, hook.pending) == (0, 0, 0, 0)
    assert not hook.failing


def test_slack_body_is_one_line_of_mrkdwn(receiver: Receiver) -> None:
    events = [
        _event(0),
        _event(
            1,
            state="resolved",
            value=0.01,
            exemplars=[
                {"trace_id": "1" * 32, "phoenix_url": None},
                {"trace_id": TRACE, "phoenix_url": PHOENIX_URL},
            ],
        ),
        _silent(2),
        _event(3, agent="a&b", dimensions={"model": "<x>", "team": "ml"}, exemplars=[]),
    ]

    async def scenario() -> None:
        hook = fast(receiver.url, body_format="slack")
        async with running(hook):
            for event in events:
                hook.offer(event)
            await until(lambda: hook.delivered == len(events), "every event")

    asyncio.run(scenario())
    link = f"<{PHOENIX_URL}|trace in Phoenix>"
    assert receiver.delivered() == [
        {
            "text": ":rotating_light: [warning] error-rate firing for coder (model=gpt-4o): "
            f"error_rate 0.12 &gt; 0.05 in window 2024-12-04T08:13:20Z{DASH}08:14:20Z {link}"
        },
        {
            "text": ":white_check_mark: [warning] error-rate resolved for coder (model=gpt-4o): "
            f"error_rate 0.01, no longer &gt; 0.05 in window 2024-12-04T08:14:20Z{DASH}08:15:20Z "
            f"{link}"
        },
        {
            "text": ":rotating_light: [critical] coder-silent firing for coder: spans &lt; 1 in "
            f"window 2024-12-04T08:15:20Z{DASH}08:16:20Z"
        },
        {
            "text": ":rotating_light: [warning] error-rate firing for a&amp;b "
            "(model=&lt;x&gt;, team=ml): error_rate 0.12 &gt; 0.05 in window "
            f"2024-12-04T08:16:20Z{DASH}08:17:20Z"
        },
    ]
    assert {r.content_type for r in receiver.requests} == {"application/json"}


def test_server_errors_are_retried_until_delivered_with_one_warning_and_one_recovery(
    receiver: Receiver, logs: Callable[[int], list[str]]
) -> None:
    receiver.statuses = [503, 503, 429, 502]
    first, second = _event(0), _event(1)

    async def scenario() -> AlertWebhook:
        async with running(fast(receiver.url)) as hook:
            hook.offer(first)
            await until(lambda: hook.delivered == 1, "the first event")
            hook.offer(second)
            await until(lambda: hook.delivered == 2, "the second event")
            return hook

    hook = asyncio.run(scenario())
    assert receiver.delivered() == [first, second]
    # Every attempt carried the first event; it was delivered once.
    assert [r.status for r in receiver.requests] == [503, 503, 429, 502, 200, 200]
    assert [r.document for r in receiver.requests[:5]] == [first] * 5
    assert (hook.delivered, hook.failed_attempts, hook.rejected) == (2, 4, 0)
    assert not hook.failing
    [warning] = logs(logging.WARNING)
    assert "is not accepting alerts (HTTP 503: refused with 503)" in warning
    [recovery] = logs(logging.INFO)
    assert "accepts alerts again after" in recovery
    assert recovery.endswith("and 4 failed attempts")
    assert not logs(logging.ERROR)


def test_everything_queued_while_nothing_listens_is_delivered_once_it_does(
    down_receiver: Receiver, logs: Callable[[int], list[str]]
) -> None:
    events = [_event(n) for n in range(5)]

    async def scenario() -> AlertWebhook:
        async with running(fast(down_receiver.url)) as hook:
            for event in events[:3]:
                hook.offer(event)
            await until(lambda: hook.failed_attempts >= 3, "failed attempts")
            assert hook.failing
            assert (hook.delivered, hook.pending) == (0, 3)
            for event in events[3:]:
                hook.offer(event)
            down_receiver.start()  # on the same port
            await until(lambda: hook.delivered == len(events), "every event")
            return hook

    hook = asyncio.run(scenario())
    assert down_receiver.delivered() == events
    assert not hook.failing
    assert (hook.rejected, hook.dropped, hook.pending) == (0, 0, 0)
    [warning] = logs(logging.WARNING)
    assert "is not accepting alerts (ConnectError" in warning
    [recovery] = logs(logging.INFO)
    assert "failed attempts" in recovery and "accepts alerts again" in recovery


@pytest.mark.parametrize("status", [400, 404])
def test_a_refused_event_is_dropped_and_the_next_one_goes(
    receiver: Receiver, logs: Callable[[int], list[str]], status: int
) -> None:
    receiver.statuses = [status]
    refused, accepted = _event(0), _event(1)

    async def scenario() -> AlertWebhook:
        async with running(fast(receiver.url)) as hook:
            hook.offer(refused)
            hook.offer(accepted)
            await until(lambda: hook.delivered + hook.rejected == 2, "both events settled")
            return hook

    hook = asyncio.run(scenario())
    assert [r.status for r in receiver.requests] == [status, 200]
    assert receiver.delivered() == [accepted]
    assert (hook.delivered, hook.rejected, hook.failed_attempts) == (1, 1, 0)
    [error] = logs(logging.ERROR)
    assert f"refused alert {refused['key']} (HTTP {status}: refused with {status})" in error
    assert URL_SETTING in error and FORMAT_SETTING in error
    assert not logs(logging.WARNING)


def test_a_full_queue_drops_the_oldest_and_counts_it(
    receiver: Receiver, logs: Callable[[int], list[str]]
) -> None:
    events = [_event(n) for n in range(5)]
    hook = fast(receiver.url, max_queue=3)
    for event in events:  # before run(): nothing leaves the queue
        hook.offer(event)
    assert (hook.dropped, hook.pending) == (2, 3)
    [warning] = logs(logging.WARNING)
    assert "queue is full (3 alerts waiting), dropping the oldest (1 dropped so far)" in warning

    async def scenario() -> None:
        async with running(hook):
            await until(lambda: hook.delivered == 3, "the events kept")

    asyncio.run(scenario())
    assert receiver.delivered() == events[2:]
    assert (hook.dropped, hook.pending) == (2, 0)


def test_offer_returns_at_once_while_the_receiver_hangs(receiver: Receiver) -> None:
    receiver.hang = 1
    events = [_event(n) for n in range(51)]

    async def scenario() -> AlertWebhook:
        async with running(fast(receiver.url)) as hook:
            hook.offer(events[0])
            await asyncio.to_thread(receiver.entered.wait, 5)
            assert receiver.entered.is_set()
            for event in events[1:]:  # the receiver holds the first request all along
                hook.offer(event)
            assert (hook.delivered, hook.pending) == (0, len(events))
            receiver.release.set()
            await until(lambda: hook.delivered == len(events), "every event")
            return hook

    hook = asyncio.run(scenario())
    assert receiver.delivered() == events
    assert hook.failed_attempts == 0


def test_offer_from_another_thread_wakes_the_delivery_loop(receiver: Receiver) -> None:
    events = [_event(n) for n in range(3)]

    async def scenario() -> None:
        async with running(fast(receiver.url)) as hook:
            await asyncio.sleep(0)  # run() is waiting for an event

            def offer_all() -> None:
                for event in events:
                    hook.offer(event)

            await asyncio.to_thread(offer_all)
            await until(lambda: hook.delivered == len(events), "every event")

    asyncio.run(scenario())
    assert receiver.delivered() == events


def test_a_request_that_times_out_is_sent_again(
    receiver: Receiver, logs: Callable[[int], list[str]]
) -> None:
    receiver.hang = 1  # held until the end of the test, long after the client gave up
    event = _event(0)

    async def scenario() -> AlertWebhook:
        async with running(fast(receiver.url, timeout_s=0.2)) as hook:
            hook.offer(event)
            await until(lambda: hook.delivered == 1, "the event")
            return hook

    hook = asyncio.run(scenario())
    assert receiver.delivered() == [event]
    assert hook.failed_attempts == 1
    [warning] = logs(logging.WARNING)
    assert "Timeout" in warning or "no answer within" in warning


def test_the_url_is_checked_and_kept_out_of_logs_and_repr(
    down_receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    for url in ("ftp://example.com/hook", "hooks.slack.com/services/x", "http://", ""):
        with pytest.raises(ValueError, match=URL_SETTING):
            AlertWebhook(url)
    with pytest.raises(ValueError, match=FORMAT_SETTING):
        AlertWebhook("https://example.com/hook", body_format="xml")  # type: ignore[arg-type]
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def scenario() -> AlertWebhook:
        async with running(fast(down_receiver.url)) as hook:
            hook.offer(_event(0))
            await until(lambda: hook.failed_attempts >= 2, "failed attempts")
            return hook

    hook = asyncio.run(scenario())
    port = down_receiver.url.split(":")[2].split("/")[0]
    assert hook.target == f"http://127.0.0.1:{port}/…"
    assert "SECRETTOKEN" not in repr(hook)
    assert caplog.records and "SECRETTOKEN" not in caplog.text


def test_the_schema_refuses_what_is_not_an_alert_event() -> None:
    good = _event(0)
    bad = [
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "mlflow_run_id"},
        {**good, "op": "=="},
        {**good, "state": "pending"},
        {**good, "severity": "page"},
        {**good, "exemplars": [{"trace_id": "XYZ", "phoenix_url": None}]},
        {**good, "dimensions": {"model": 4}},
    ]
    for event in bad:
        with pytest.raises(jsonschema.ValidationError):
            VALIDATOR.validate(event)


def test_a_cancelled_run_keeps_the_event_it_was_retrying(down_receiver: Receiver) -> None:
    events = [_event(n) for n in range(2)]
    hook = fast(down_receiver.url)

    async def scenario() -> None:
        task = asyncio.create_task(hook.run())
        for event in events:
            hook.offer(event)
        await until(lambda: hook.failed_attempts >= 1, "a failed attempt")
        with pytest.raises(RuntimeError, match="already running"):
            await hook.run()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert hook.pending == 2
        down_receiver.start()
        async with running(hook):  # a new run picks up where the last one stopped
            await until(lambda: hook.delivered == 2, "both events")

    asyncio.run(scenario())
    assert down_receiver.delivered() == events


def test_an_event_that_cannot_be_encoded_is_refused_without_raising(receiver: Receiver) -> None:
    hook = fast(receiver.url)
    hook.offer({**_event(0), "value": {1, 2}})  # a set: not JSON
    assert (hook.rejected, hook.pending) == (1, 0)
    asyncio.run(hook.close())
