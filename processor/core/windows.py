"""Tumbling event-time windows and per-partition watermarks, in integer milliseconds."""

from __future__ import annotations

from dataclasses import dataclass


def window_start(timestamp_ms: int, size_ms: int) -> int:
    """Start of the half-open window ``[start, start + size)`` holding ``timestamp_ms``."""
    return timestamp_ms - timestamp_ms % size_ms


def window_index(start_ms: int, size_ms: int) -> int:
    """The window's ordinal since the epoch: MLflow's ``step`` for that window."""
    return start_ms // size_ms


@dataclass(slots=True)
class Watermark:
    """The event time below which a partition expects no more spans.

    It is the largest end time seen minus the allowed lateness. When the partition has been
    idle (no message) for ``idle_timeout_ms`` of wall-clock time, it follows the clock instead
    (``now - allowed_lateness``), so a quiet partition does not hold windows open forever.
    It never moves backwards.
    """

    allowed_lateness_ms: int
    idle_timeout_ms: int
    max_event_ms: int | None = None
    last_message_at_ms: int | None = None
    value_ms: int | None = None

    def observe(self, event_ms: int, now_ms: int) -> None:
        self.last_message_at_ms = now_ms
        if self.max_event_ms is None or event_ms > self.max_event_ms:
            self.max_event_ms = event_ms
            self._raise_to(event_ms - self.allowed_lateness_ms)

    def touch(self, now_ms: int) -> None:
        """A message arrived (maybe with no usable span): the partition is not idle."""
        self.last_message_at_ms = now_ms

    def tick(self, now_ms: int, *, caught_up: bool) -> int | None:
        """Advance with the clock if the partition is idle; return the current value.

        Idle means caught up with the partition's end *and* no message for the idle timeout:
        a worker replaying a backlog must not let the clock overtake the data it is reading.
        """
        idle_since = self.last_message_at_ms
        quiet = idle_since is None or now_ms - idle_since >= self.idle_timeout_ms
        if caught_up and quiet:
            self._raise_to(now_ms - self.allowed_lateness_ms)
        return self.value_ms

    def _raise_to(self, candidate_ms: int) -> None:
        if self.value_ms is None or candidate_ms > self.value_ms:
            self.value_ms = candidate_ms
