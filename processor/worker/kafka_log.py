"""The worker's connection to Kafka as its log should tell it: state changes, not a storm.

When a broker goes away, the Kafka client libraries (aiokafka, and faust and mode above it)
log every retry of every connection, metadata refresh, fetch, heartbeat and produce request:
thousands of lines a minute, for as long as it lasts. ``KafkaLogQuieter`` is a logging
filter on the worker's handlers that turns that into a few lines:

- ``kafka unreachable: ...`` (WARNING) at the first client record that says a connection
  failed;
- ``kafka unreachable for 2m10s (node 1), 1,234 repeated client log lines suppressed (...)``
  (WARNING) every ``summary_interval_s`` while it lasts;
- ``kafka reachable again after 1m52s (node 1), 20,118 repeated client log lines suppressed``
  (INFO) once the clients' connection errors have stopped for ``settle_s`` and a bootstrap
  server accepts a TCP connection.

While Kafka is unreachable, the first record of each *kind* (logger, level, message template)
of the client libraries passes, whatever its level, and the rest are counted: the burst of
coordinator and commit retries right after the broker returns is part of the outage too.
Otherwise a client warning or error of one kind passes at most once per
``repeat_interval_s``, and the repeats are counted in an INFO line at the next summary; the
clients' INFO records (assignments, rebalances) pass. Records of other loggers (the
processor's own) always pass. ``passthrough`` (the worker at DEBUG) lets everything through;
the state lines are written all the same.

Why the state is read from the log: the clients keep their connections to themselves
(aiokafka's live in each client's event loop, faust's consumer in a thread of its own), but
each of them, the consumers, the producer, the forward role's consumer and the admin clients,
logs every failure through these loggers. Why the probe as well: failures alone cannot say
when Kafka is back; and with a black-holed network a connect hangs until its timeout, so the
errors come seconds apart, and a pause in them proves nothing by itself.

The filter is shared by several handlers and runs once per record (the verdict is kept on the
record). Summaries and the return to "reachable" need time to pass without records:
``start_ticking`` calls ``tick`` from a daemon thread every second.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

CLIENT_LOGGERS = frozenset({"aiokafka", "faust", "mode", "kafka"})
# What aiokafka says when a connection fails or a node cannot be reached; matched in the
# record's message (the errors are formatted into it) and the names of its exception's types.
CONNECTION_ERROR_MARKERS = (
    "Unable connect to",
    "Unable to update metadata",
    "Unable to request metadata",
    "Connect call failed",
    "Connection refused",
    "Connection reset",
    "NodeNotReadyError",
    "KafkaConnectionError",
    "RequestTimedOutError",
    "KafkaTimeoutError",
)
CONNECTION_ERROR_TYPES = frozenset(
    {
        "KafkaConnectionError",
        "NodeNotReadyError",
        "RequestTimedOutError",
        "KafkaTimeoutError",
        "ConnectionRefusedError",
        "ConnectionResetError",
    }
)
SUMMARY_INTERVAL_S = 60.0
SETTLE_S = 5.0
REPEAT_INTERVAL_S = 60.0
PROBE_TIMEOUT_S = 2.0
TICK_INTERVAL_S = 1.0
MAX_KINDS = 1_000  # distinct kinds tracked at once; beyond, new kinds pass untracked
SUMMARY_KINDS = 3  # kinds named in a summary line
EXAMPLE_CHARS = 80
_VERDICT = "_kafka_log_verdict"
_DIGITS = re.compile(r"\d+")
# Where a failing connection pointed: aiokafka names a node id or an address.
_NODE = re.compile(r"node (?:with )?id (\d+)")
_ADDRESS = re.compile(
    r"""Connection at (\S+:\d+)|Unable connect to "([^"]+)"|\('([^']+)', (\d+)\)"""
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Kind:
    """One kind of client record: its first message, and its repeats not logged."""

    example: str
    logger: str
    passed_at: float
    suppressed: int = 0  # since the last summary (or the outage's start)


def is_client_record(record: logging.LogRecord) -> bool:
    return record.name.split(".", 1)[0] in CLIENT_LOGGERS


def is_connection_error(record: logging.LogRecord) -> bool:
    """Does this client record say that a connection to Kafka failed?"""
    if record.levelno < logging.WARNING:
        return False
    error = record.exc_info[1] if record.exc_info else None
    if error is not None and any(t.__name__ in CONNECTION_ERROR_TYPES for t in type(error).__mro__):
        return True
    message = record.getMessage()
    return any(marker in message for marker in CONNECTION_ERROR_MARKERS)


def kind_of(record: logging.LogRecord) -> tuple[str, int, str]:
    """(logger, level, template): records differing only in their arguments are one kind.

    Digits are folded too, for the messages formatted before they were logged."""
    template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
    return record.name, record.levelno, _DIGITS.sub("#", template)


def peers_of(message: str) -> set[str]:
    """The nodes and addresses a client error names (``node 1``, ``127.0.0.1:9092``)."""
    found = {f"node {node}" for node in _NODE.findall(message)}
    for closed, unable, host, port in _ADDRESS.findall(message):
        found.add(closed or unable or f"{host}:{port}")
    return found


def format_duration(seconds: float) -> str:
    """``45s``, ``2m10s``, ``1h03m``; ``<1s`` for a blip."""
    if seconds < 1:
        return "<1s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _lines(count: int) -> str:
    return f"{count:,} repeated client log line{'' if count == 1 else 's'}"


def bootstrap_probe(servers: str, timeout_s: float = PROBE_TIMEOUT_S) -> Callable[[], bool]:
    """A check that one of ``servers`` (``host:port,...``) accepts a TCP connection."""
    addresses = [_host_port(server) for server in servers.split(",") if server.strip()]

    def probe() -> bool:
        for address in addresses:
            try:
                with socket.create_connection(address, timeout=timeout_s) as sock:
                    # Nothing listening on a port in the ephemeral range, a connect can be
                    # handed that very port as its own and connect to itself.
                    if sock.getsockname() != sock.getpeername():
                        return True
            except OSError:
                continue
        return False

    return probe


def _host_port(server: str) -> tuple[str, int]:
    server = server.strip().removeprefix("kafka://")
    host, _, port = server.rpartition(":")
    if not host:  # no port given: Kafka's own
        return server.strip("[]"), 9092
    return host.strip("[]"), int(port)


class KafkaLogQuieter(logging.Filter):
    """Tracks the worker's connection to Kafka from the client records; keeps their repeats
    out of the log (see the module docstring). ``clock`` is monotonic seconds."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        probe: Callable[[], bool] = lambda: True,
        report: logging.Logger = log,
        passthrough: bool = False,
        summary_interval_s: float = SUMMARY_INTERVAL_S,
        settle_s: float = SETTLE_S,
        repeat_interval_s: float = REPEAT_INTERVAL_S,
    ) -> None:
        super().__init__()
        self._clock = clock
        self._probe = probe
        self._report = report
        self.passthrough = passthrough
        self._summary_interval_s = summary_interval_s
        self._settle_s = settle_s
        self._repeat_interval_s = repeat_interval_s
        # Records come from the event loop's thread and faust's consumer thread.
        self._lock = threading.Lock()
        self._kinds: dict[tuple[str, int, str], _Kind] = {}
        self._down_since: float | None = None
        self._last_error_at = 0.0
        self._last_summary_at = clock()
        self._peers: set[str] = set()
        self._outage_suppressed = 0
        self._pending: list[tuple[int, str]] = []  # state lines to write once the lock is free
        self._ticker: threading.Thread | None = None

    def configure(self, *, probe: Callable[[], bool], passthrough: bool) -> None:
        self._probe = probe
        self.passthrough = passthrough

    def filter(self, record: logging.LogRecord) -> bool:
        verdict = record.__dict__.get(_VERDICT)
        if verdict is None:
            verdict = record.__dict__[_VERDICT] = self._judge(record)
        return bool(verdict)

    def _judge(self, record: logging.LogRecord) -> bool:
        if not is_client_record(record):
            return True
        now = self._clock()
        failed = is_connection_error(record)
        with self._lock:
            if failed:
                self._last_error_at = now
                self._peers |= peers_of(record.getMessage())
                if self._down_since is None:
                    self._go_down(now)
            outage = self._down_since is not None
            if self.passthrough or not (outage or record.levelno >= logging.WARNING):
                passes = True
            else:
                passes = self._note(record, now, expires=not outage)
        self._write_pending()  # the "unreachable" line comes before the record that caused it
        return passes

    def _note(self, record: logging.LogRecord, now: float, *, expires: bool) -> bool:
        """True when the record is the first of its kind (for now); else count it."""
        key = kind_of(record)
        kind = self._kinds.get(key)
        if kind is None:
            if len(self._kinds) < MAX_KINDS:
                example = record.getMessage()
                if len(example) > EXAMPLE_CHARS:
                    example = example[: EXAMPLE_CHARS - 3] + "..."
                self._kinds[key] = _Kind(example, record.name, now)
            return True
        if expires and now - kind.passed_at >= self._repeat_interval_s:
            kind.passed_at = now
            return True
        kind.suppressed += 1
        if self._down_since is not None:
            self._outage_suppressed += 1
        return False

    def _go_down(self, now: float) -> None:
        # Repeats counted before belong to the summary of normal times, not to the outage.
        self._summarise_repeats(now)
        self._down_since = now
        self._last_summary_at = now
        self._outage_suppressed = 0
        self._kinds.clear()  # each kind's first record of the outage shows
        quieting = (
            "all their lines are logged (DEBUG)"
            if self.passthrough
            else "each kind is logged once and its repeats are counted until they stop"
        )
        self._pending.append(
            (
                logging.WARNING,
                f"kafka unreachable: the Kafka clients report connection errors; {quieting}",
            )
        )

    def tick(self) -> None:
        """While unreachable, check whether Kafka is back; write the summary when due."""
        now = self._clock()
        with self._lock:
            down = self._down_since
            settled = down is not None and now - self._last_error_at >= self._settle_s
        if settled and self._probe():  # outside the lock: it may take its timeout
            with self._lock:
                # Back only if no client error came while the probe ran.
                if self._down_since == down and self._last_error_at < now:
                    self._go_up(self._clock())
        with self._lock:
            down = self._down_since
            if now - self._last_summary_at >= self._summary_interval_s:
                if down is None:
                    self._summarise_repeats(now)
                else:
                    self._last_summary_at = now
                    self._pending.append(
                        (
                            logging.WARNING,
                            f"kafka unreachable for {format_duration(now - down)}"
                            f"{self._where()}, {_lines(self._outage_suppressed)} suppressed"
                            f"{self._top_kinds()}",
                        )
                    )
        self._write_pending()

    def _go_up(self, now: float) -> None:
        down = self._down_since
        assert down is not None
        self._pending.append(
            (
                logging.INFO,
                # Away until the clients' errors stopped: the settling and probe come after.
                f"kafka reachable again after {format_duration(self._last_error_at - down)}"
                f"{self._where()}, {_lines(self._outage_suppressed)} suppressed",
            )
        )
        self._down_since = None
        self._peers = set()
        self._kinds.clear()
        self._outage_suppressed = 0
        self._last_summary_at = now

    def _summarise_repeats(self, now: float) -> None:
        """The repeats of normal times since the last summary, if any; forget old kinds."""
        suppressed = sum(kind.suppressed for kind in self._kinds.values())
        if suppressed:
            self._pending.append(
                (
                    logging.INFO,
                    f"{_lines(suppressed)} suppressed in the last "
                    f"{format_duration(now - self._last_summary_at)}{self._top_kinds()}",
                )
            )
        for key, kind in list(self._kinds.items()):
            kind.suppressed = 0
            if now - kind.passed_at >= self._repeat_interval_s:
                del self._kinds[key]
        self._last_summary_at = now

    def _top_kinds(self) -> str:
        ranked = sorted(
            (kind for kind in self._kinds.values() if kind.suppressed),
            key=lambda kind: kind.suppressed,
            reverse=True,
        )
        if not ranked:
            return ""
        named = ", ".join(
            f'{kind.logger} "{kind.example}" x{kind.suppressed:,}'
            for kind in ranked[:SUMMARY_KINDS]
        )
        more = len(ranked) - SUMMARY_KINDS
        return f": {named}" + (f", {more} more kinds" if more > 0 else "")

    def _where(self) -> str:
        return f" ({', '.join(sorted(self._peers))})" if self._peers else ""

    def _write_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for level, message in pending:
            self._report.log(level, message)

    def start_ticking(self, interval_s: float = TICK_INTERVAL_S) -> None:
        """Call ``tick`` every ``interval_s`` from a daemon thread (once per process)."""
        if self._ticker is not None and self._ticker.is_alive():
            return

        def run() -> None:
            while True:
                time.sleep(interval_s)
                try:
                    self.tick()
                except Exception:  # a summary must never end the ticking
                    continue

        self._ticker = threading.Thread(target=run, name="kafka-log-ticker", daemon=True)
        self._ticker.start()


kafka_log_quieter = KafkaLogQuieter()
"""The worker's quieter; installed on its handlers by ``logging_setup.logging_config``."""
