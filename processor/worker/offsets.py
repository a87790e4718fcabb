"""Each role's record of its partitions: what it was given, what it handled, what may be committed.

Every role (aggregate, finalize, forward) reads a topic and commits by one rule: an offset is
safe when every message before it is handled *and* out of the role's hands (in a partial and a
kept-span record Kafka acknowledged, in MLflow, in Phoenix). ``PartitionOffsets`` is the one
place that turns the role's holds into the offset to commit; the roles only say what they
hold. A replay after a rebalance or a crash starts at the committed offset, so a message seen
before (a redelivery of one already handled) is skipped here, once, for every role.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from processor.worker.assignment import ResumeWatch


@dataclass(frozen=True, slots=True)
class Commit:
    """An offset to commit for one partition, with the metadata a replay from it needs."""

    offset: int
    metadata: str = ""


class PartitionOffsets:
    """Assigned partitions, the next offset of each, and the safe offset (never moving back)."""

    def __init__(self, logger: logging.Logger, role: str, *, compacted: bool = False) -> None:
        self._next: dict[int, int] = {}
        self._safe: dict[int, int] = {}
        self._assigned: set[int] = set()
        # partition -> offset -> holders: messages whose data is on its way out right now
        self._busy: dict[int, dict[int, int]] = {}
        self._resume = ResumeWatch(logger, role, compacted=compacted)

    @property
    def assigned(self) -> frozenset[int]:
        return frozenset(self._assigned)

    def assign(self, partition: int, committed: int | None, resume_at: int | None = None) -> None:
        """Take ``partition``; ``committed`` is the group's offset (None: no commit yet), and
        ``resume_at`` where the role's state says reading resumes (default: ``committed``)."""
        self._assigned.add(partition)
        start = resume_at if resume_at is not None else committed
        if start is not None:
            self._next[partition] = start
            self._safe[partition] = start
        self._resume.expect(partition, committed)

    def revoke(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self._assigned.discard(partition)
            self._next.pop(partition, None)
            self._safe.pop(partition, None)
            self._busy.pop(partition, None)
            self._resume.forget(partition)

    def revoke_all(self) -> None:
        self.revoke(list(self._assigned))

    def accept(self, partition: int, offset: int) -> bool:
        """Whether to handle this message: the partition is ours and the offset not seen yet."""
        if partition not in self._assigned:
            return False  # read before a rebalance took it away: its new owner reads it again
        expected = self._next.get(partition)
        if expected is not None and offset < expected:
            return False  # seen already: the fetch went back over it
        self._resume.handled(partition, offset)
        self._next[partition] = offset + 1
        return True

    @contextmanager
    def busy(self, partition: int, offset: int) -> Iterator[None]:
        """Hold the commit at ``offset`` while the role awaits something for that message
        (a send to Kafka, say): a tick meanwhile must not commit past it."""
        held = self._busy.setdefault(partition, {})
        held[offset] = held.get(offset, 0) + 1
        try:
            yield
        finally:
            still = self._busy.get(partition)  # None: revoked meanwhile
            if still is not None and offset in still:
                still[offset] -= 1
                if not still[offset]:
                    del still[offset]

    def busy_from(self, partition: int) -> int | None:
        """The smallest offset held by ``busy`` (None: none)."""
        held = self._busy.get(partition)
        return min(held) if held else None

    def next_offset(self, partition: int) -> int | None:
        """The offset after the last message handled (or where reading resumed, before any)."""
        return self._next.get(partition)

    def safe(self, partition: int, *holds: int | None) -> int | None:
        """The offset to commit: the next offset, held back by each hold (the smallest offset
        the role still needs), never below one returned before. None: nothing handled yet."""
        offset = self._next.get(partition)
        if offset is None:
            return None
        for hold in (*holds, self.busy_from(partition)):
            if hold is not None and hold < offset:
                offset = hold
        before = self._safe.get(partition)
        if before is not None and offset < before:
            return before  # that offset may be committed already
        self._safe[partition] = offset
        return offset
