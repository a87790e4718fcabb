"""Tumbling event-time windows and the per-partition watermark, with an injected clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spanbuilder import T0_MS

from processor.core.windows import Watermark, window_index, window_start

MINUTE = 60_000


@pytest.mark.parametrize(
    ("timestamp_ms", "size_ms", "start_ms"),
    [
        (0, 1_000, 0),
        (1, 1_000, 0),
        (999, 1_000, 0),
        (1_000, 1_000, 1_000),  # exactly at a start: that window, not the one before
        (1_001, 1_000, 1_000),
        (T0_MS, MINUTE, T0_MS),
        (T0_MS - 1, MINUTE, T0_MS - MINUTE),
        (T0_MS + MINUTE - 1, MINUTE, T0_MS),
        (T0_MS + MINUTE, MINUTE, T0_MS + MINUTE),
        (T0_MS + 12_345, 1_000, T0_MS + 12_000),
        (59_999, MINUTE, 0),
    ],
)
def test_window_start(timestamp_ms: int, size_ms: int, start_ms: int) -> None:
    assert window_start(timestamp_ms, size_ms) == start_ms


@pytest.mark.parametrize(
    ("start_ms", "size_ms", "index"),
    [(0, MINUTE, 0), (MINUTE, MINUTE, 1), (T0_MS, MINUTE, T0_MS // MINUTE), (5_000, 1_000, 5)],
)
def test_window_index_counts_windows_since_the_epoch(
    start_ms: int, size_ms: int, index: int
) -> None:
    assert window_index(start_ms, size_ms) == index


@settings(max_examples=300)
@given(timestamp=st.integers(0, 2**53), size=st.sampled_from([1, 1_000, 60_000, 3_600_000]))
def test_a_timestamp_lies_in_exactly_one_half_open_window(timestamp: int, size: int) -> None:
    start = window_start(timestamp, size)
    assert start % size == 0
    assert start <= timestamp < start + size
    # the last instant before it and the first after it belong to the neighbours
    if start > 0:
        assert window_start(start - 1, size) == start - size
    assert window_start(start + size, size) == start + size


# --- the watermark -----------------------------------------------------------------------------

LATENESS = 5_000
IDLE = 30_000


def watermark() -> Watermark:
    return Watermark(allowed_lateness_ms=LATENESS, idle_timeout_ms=IDLE)


def test_the_watermark_is_the_largest_end_seen_minus_the_lateness() -> None:
    mark = watermark()
    assert mark.tick(now_ms=0, caught_up=False) is None  # nothing seen yet

    mark.observe(T0_MS + 10_000, now_ms=1)
    mark.observe(T0_MS + 2_000, now_ms=2)  # out of order: does not pull it back

    assert mark.value_ms == T0_MS + 10_000 - LATENESS
    assert mark.max_event_ms == T0_MS + 10_000


@pytest.mark.parametrize(
    ("last_message_at", "now", "caught_up", "expected"),
    [
        # caught up and quiet for the idle timeout: follows the clock
        (0, IDLE, True, T0_MS + IDLE - LATENESS),
        (0, IDLE + 7, True, T0_MS + IDLE + 7 - LATENESS),
        # not yet quiet long enough
        (0, IDLE - 1, True, None),
        # replaying a backlog: the clock must not overtake the data being read
        (0, IDLE * 10, False, None),
    ],
)
def test_an_idle_partition_advances_with_the_clock_only_when_caught_up(
    last_message_at: int, now: int, caught_up: bool, expected: int | None
) -> None:
    mark = watermark()
    mark.touch(T0_MS + last_message_at)
    assert mark.tick(T0_MS + now, caught_up=caught_up) == expected


def test_a_message_makes_the_partition_busy_again() -> None:
    mark = watermark()
    mark.observe(T0_MS, now_ms=T0_MS)
    mark.touch(T0_MS + IDLE - 1)  # a message with no usable span still counts
    assert mark.tick(T0_MS + IDLE, caught_up=True) == T0_MS - LATENESS
    assert mark.tick(T0_MS + 2 * IDLE, caught_up=True) == T0_MS + 2 * IDLE - LATENESS


def test_the_watermark_never_moves_backwards() -> None:
    mark = watermark()
    mark.tick(T0_MS + 100_000, caught_up=True)  # idle advance far ahead
    ahead = mark.value_ms
    mark.observe(T0_MS, now_ms=T0_MS + 100_001)  # old data arrives
    assert mark.tick(T0_MS + 50_000, caught_up=True) == ahead  # and the clock jumps back


watermark_steps = st.lists(
    st.one_of(
        st.tuples(st.just("observe"), st.integers(0, 10**6), st.integers(0, 10**6)),
        st.tuples(st.just("touch"), st.integers(0, 10**6), st.just(0)),
        st.tuples(st.just("tick"), st.integers(0, 10**6), st.booleans()),
    ),
    max_size=30,
)


@settings(max_examples=300)
@given(watermark_steps)
def test_watermark_laws(steps: list[tuple[str, int, int]]) -> None:
    mark = watermark()
    previous: int | None = None
    bound: int | None = None  # what the watermark may reach: data or clock, minus lateness
    for op, a, b in steps:
        if op == "observe":
            mark.observe(event_ms=a, now_ms=b)
            reach = a - LATENESS
        elif op == "touch":
            mark.touch(now_ms=a)
            reach = None
        else:
            mark.tick(now_ms=a, caught_up=bool(b))
            reach = a - LATENESS if b else None
        if reach is not None:
            bound = reach if bound is None else max(bound, reach)
        value = mark.value_ms
        if previous is not None:
            assert value is not None and value >= previous
        if value is not None:
            assert bound is not None and value <= bound
        previous = value
