"""The worker's logging: plain text or one JSON object per line, never a secret.

``configure_logging(settings)`` applies the configuration at once and returns it as a
``logging.config.dictConfig`` dict; hand that to ``faust.Worker(logging_config=...)``, because
mode replaces the root handlers when the worker starts and would otherwise drop ours.

Every record carries the worker id. A record also carries ``partition``, ``offset``, ``topic``,
``agent``, ``window_start_ms`` or ``window_end_ms`` when the logging call passes them as
``extra=`` (e.g. ``log.warning("...", extra={"partition": p, "offset": o})``); the JSON format
puts them in their own keys, the text format appends them as ``key=value``.

Secrets: every ``SecretStr`` setting, the MLflow credentials read from the environment, bearer
tokens and passwords in URLs are masked in the final line, whatever the logging call did.

The last warnings and errors are kept in memory (``recent_problems``) for the worker's
``/status`` endpoint, masked like everything else.

The Kafka client libraries' repeated lines are kept out of both (``kafka_log.KafkaLogQuieter``):
while Kafka is unreachable the log says when it went away, every minute how long it has been
away, and when it is back; otherwise a client warning of one kind shows at most once a minute.
At DEBUG every line passes.
"""

from __future__ import annotations

import logging
import logging.config
import os
import re
import socket
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import SecretStr

from processor.settings import WorkerSettings
from processor.worker.kafka_log import bootstrap_probe, kafka_log_quieter

CONTEXT_FIELDS = ("partition", "offset", "topic", "agent", "window_start_ms", "window_end_ms")
MASK = "********"
RECENT_PROBLEMS = 50
# MLflow's client reads its credentials from these; they must not leak through a log line.
SECRET_ENVIRONMENT = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PHOENIX_API_KEY")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+")
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+@")
_MIN_SECRET_LENGTH = 4  # masking a one-letter "secret" would mangle every line


def worker_id_of(settings: WorkerSettings) -> str:
    """The worker's name: ``PROCESSOR_WORKER_ID``, else ``<hostname>-<pid>``."""
    return settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"


def secrets_of(settings: WorkerSettings) -> list[str]:
    """The secret values a log line must never show."""
    found: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
    found.extend(os.environ.get(name, "") for name in SECRET_ENVIRONMENT)
    return sorted({s for s in found if len(s) >= _MIN_SECRET_LENGTH}, key=len, reverse=True)


class SecretMasker:
    """Replaces known secret values, bearer tokens and URL passwords in a text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so that a secret containing another is masked whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        text = _BEARER.sub(rf"\g<1>{MASK}", text)
        return _URL_PASSWORD.sub(rf"\g<1>{MASK}@", text)


class WorkerContext(logging.Filter):
    """Stamps every record with the worker id (and never drops one)."""

    def __init__(self, worker_id: str) -> None:
        super().__init__()
        self.worker_id = worker_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker_id = self.worker_id
        return True


def _context_of(record: logging.LogRecord) -> dict[str, Any]:
    return {
        name: value for name in CONTEXT_FIELDS if (value := getattr(record, name, None)) is not None
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, worker_id, message, context, exception."""

    def __init__(self, masker: SecretMasker | None = None) -> None:
        super().__init__()
        self._mask = masker or SecretMasker()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "worker_id": getattr(record, "worker_id", None),
            "message": self._mask(record.getMessage()),
        }
        entry.update(_context_of(record))
        if record.exc_info:
            entry["exception"] = self._mask(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = self._mask(record.exc_text)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """``time level [worker] logger: message key=value...``, masked."""

    def __init__(self, masker: SecretMasker | None = None) -> None:
        super().__init__("%(asctime)s %(levelname)-7s [%(worker_id)s] %(name)s: %(message)s")
        self._mask = masker or SecretMasker()

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "worker_id"):
            record.worker_id = "-"
        line = super().format(record)
        context = _context_of(record)
        if context:
            line += " " + " ".join(f"{key}={value}" for key, value in context.items())
        return self._mask(line)


class RecentProblems(logging.Handler):
    """Keeps the last warnings and errors, masked, for the worker's ``/status``."""

    def __init__(self, maxlen: int = RECENT_PROBLEMS) -> None:
        super().__init__(level=logging.WARNING)
        self._records: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self._mask = SecretMasker()

    def use_masker(self, masker: SecretMasker) -> None:
        self._mask = masker

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = {
                "ts_ms": int(record.created * 1000),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": self._mask(record.getMessage())[:500],
            }
            entry.update(_context_of(record))
            self._records.append(entry)
        except Exception:
            self.handleError(record)

    def snapshot(self) -> list[dict[str, Any]]:
        return list(self._records)


recent_problems = RecentProblems()
"""The worker's recent warnings and errors; attached to the root logger by configure_logging."""


def logging_config(settings: WorkerSettings) -> dict[str, Any]:
    """The dictConfig of the worker's logging (see the module docstring)."""
    masker = SecretMasker(secrets_of(settings))
    recent_problems.use_masker(masker)
    recent_problems.filters.clear()  # applied more than once: one worker filter is enough
    formatter: logging.Formatter = (
        JsonFormatter(masker) if settings.log_format == "json" else TextFormatter(masker)
    )
    context = WorkerContext(worker_id_of(settings))
    level = settings.log_level.upper()
    kafka_log_quieter.configure(
        probe=bootstrap_probe(settings.kafka_bootstrap_servers), passthrough=level == "DEBUG"
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "worker": {"()": lambda: context},
            # On the handlers, not the loggers: a logger's filter misses its children's records.
            "kafka": {"()": lambda: kafka_log_quieter},
        },
        "formatters": {"worker": {"()": lambda: formatter}},
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "worker",
                "filters": ["worker", "kafka"],
                "level": level,
            },
            # A storm would push every other warning out of /status: quieted too.
            "recent": {"()": lambda: recent_problems, "filters": ["worker", "kafka"]},
        },
        "root": {"level": level, "handlers": ["console", "recent"]},
        # Every HTTP request at INFO would drown the worker's own lines.
        "loggers": {"httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"}},
    }


def configure_logging(settings: WorkerSettings) -> dict[str, Any]:
    """Apply the worker's logging now; return the dictConfig for ``faust.Worker``.

    The dict returned is a fresh one: dictConfig consumes parts of the dict it applies. Also
    starts the thread that writes the Kafka state's summaries.
    """
    logging.config.dictConfig(logging_config(settings))
    kafka_log_quieter.start_ticking()
    return logging_config(settings)
