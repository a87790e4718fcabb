"""The project's exceptions, in one tree.

    ProcessorError
    ├── ConfigurationError     bad settings: start-up stops with a message that says what to fix
    ├── InvalidInput           the input's fault: becomes a dead letter carrying ``reason``
    │   └── DecodeError        the message could not be decoded at all
    ├── StackError             a local service could not be started or reached
    └── ExportError            a sink (Phoenix, MLflow) failed
        ├── RetryableExportError   the environment's fault: retried with backoff
        └── PermanentExportError   the request's fault: dead-lettered, never retried

Foreign exceptions (protobuf, httpx, aiokafka, MLflow) are translated where they enter, with
``raise ... from exc``; a failure that fits none of these is a bug and crashes loudly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class ProcessorError(Exception):
    """Base of every error the project raises on purpose."""


class ConfigurationError(ProcessorError):
    """A setting is missing or wrong; the message names it and what to do."""

    @classmethod
    def from_validation(cls, exc: ValidationError) -> ConfigurationError:
        lines = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]) or "settings"
            # pydantic prefixes a validator's own message with "Value error, ": noise here.
            lines.append(f"  {name}: {error['msg'].removeprefix('Value error, ')}")
        return cls("invalid configuration:\n" + "\n".join(lines))


class InvalidInput(ProcessorError):
    """Input that breaks a rule. ``reason`` is a short stable code, ``detail`` is for people."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class DecodeError(InvalidInput):
    """The bytes are not an OTLP trace export request in any encoding we accept."""


class StackError(ProcessorError):
    """The local stack could not do what was asked; the message says what to do."""


class ExportError(ProcessorError):
    """A sink did not accept what was sent."""


class RetryableExportError(ExportError):
    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentExportError(ExportError):
    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body
