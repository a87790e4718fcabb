"""Finalize: partials of every source partition merge into one final rollup per series and window.

What a user relies on: a replayed partial never counts twice; a window is final (and complete)
only when every source partition has closed it; a silent partition delays it at most
``max_wait_ms``, and then the rollup says it is incomplete.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.core.aggregate import WindowAggregate
from processor.core.merge import RollupMerger
from processor.core.rollup import FinalRollup, PartialRollup, PartitionProgress, SeriesKey

W = 1_700_000_040_000
SIZE = 60_000
MAX_WAIT = 30_000
PLANNER = SeriesKey("planner")


def partial(
    source: int, spans: int, *, start: int = W, series: SeriesKey = PLANNER, errors: int = 0
) -> PartialRollup:
    return PartialRollup(series, start, SIZE, source, WindowAggregate(spans=spans, errors=errors))


def closed(source: int, until: int) -> PartitionProgress:
    return PartitionProgress(source, until)


def merger(partitions: int = 2) -> RollupMerger:
    return RollupMerger(source_partitions=partitions, max_wait_ms=MAX_WAIT)


def test_a_window_is_final_once_every_source_partition_has_closed_it() -> None:
    m = merger(partitions=2)
    m.add_partial(partial(0, spans=3), now_ms=0)
    m.add_partial(partial(1, spans=4, errors=1), now_ms=0)
    m.add_progress(closed(0, W + SIZE))
    assert m.ready(now_ms=1) == []  # partition 1 has not said it is done

    m.add_progress(closed(1, W + SIZE - 1))
    assert m.ready(now_ms=2) == []  # partition 1 is not past the window's end yet

    m.add_progress(closed(1, W + SIZE))
    [final] = m.ready(now_ms=3)

    assert final.complete
    assert (final.aggregate.spans, final.aggregate.errors) == (7, 1)
    assert final.source_partitions == (0, 1)
    assert final.metrics()["window_complete"] == 1.0
    assert final.step == W // SIZE
    assert final.window_end_ms == W + SIZE
    assert m.pending_windows == 0
    assert m.ready(now_ms=4) == []  # popped: never written twice


def test_a_replayed_partial_replaces_its_twin() -> None:
    m = merger(partitions=2)
    m.add_partial(partial(0, spans=3), now_ms=0)
    m.add_partial(partial(1, spans=4), now_ms=0)
    m.add_partial(partial(0, spans=3), now_ms=5)  # aggregate of partition 0 replayed
    m.add_progress(closed(0, W + SIZE))
    m.add_progress(closed(1, W + SIZE))

    [final] = m.ready(now_ms=6)

    assert final.aggregate.spans == 7


def test_a_partition_with_nothing_in_the_window_only_has_to_close_it() -> None:
    m = merger(partitions=3)
    m.add_partial(partial(2, spans=5), now_ms=0)
    for source in range(3):
        m.add_progress(closed(source, W + 2 * SIZE))

    [final] = m.ready(now_ms=0)

    assert final.complete and final.aggregate.spans == 5
    assert final.source_partitions == (2,)


def test_progress_never_goes_backwards() -> None:
    m = merger(partitions=1)
    m.add_progress(closed(0, W + SIZE))
    m.add_progress(closed(0, W))  # an older mark, delivered late
    assert m.all_closed_until() == W + SIZE


def test_a_silent_partition_delays_a_window_at_most_max_wait_then_it_is_incomplete() -> None:
    m = merger(partitions=2)
    m.add_partial(partial(0, spans=3), now_ms=1_000)
    m.add_progress(closed(0, W + SIZE))
    assert m.ready(now_ms=1_000 + MAX_WAIT - 1) == []

    [final] = m.ready(now_ms=1_000 + MAX_WAIT)

    assert not final.complete
    assert final.metrics()["window_complete"] == 0.0
    assert final.aggregate.spans == 3


def test_finals_come_out_oldest_window_first() -> None:
    m = merger(partitions=1)
    for start, agent in [(W + SIZE, "a"), (W, "b"), (W, "a")]:
        m.add_partial(partial(0, spans=1, start=start, series=SeriesKey(agent)), now_ms=0)
    m.add_progress(closed(0, W + 2 * SIZE))

    assert [(f.window_start_ms, f.series.agent) for f in m.ready(now_ms=0)] == [
        (W, "a"),
        (W, "b"),
        (W + SIZE, "a"),
    ]


def test_a_twin_replayed_after_its_window_was_written_changes_nothing() -> None:
    m = merger(partitions=2)
    m.add_partial(partial(0, spans=3), now_ms=0)
    m.add_partial(partial(1, spans=4), now_ms=0)
    m.add_progress(closed(0, W + SIZE))
    m.add_progress(closed(1, W + SIZE))
    [first] = m.ready(now_ms=1)

    # aggregate of partition 0 crashed before committing and sends its partial again
    m.add_partial(partial(0, spans=3), now_ms=2)
    m.add_progress(closed(0, W + SIZE))
    again = m.ready(now_ms=2 + MAX_WAIT)

    # MLflow keeps every distinct value of a step: a second, smaller number would be a lie
    assert all(final.metrics() == first.metrics() for final in again)


def test_a_partial_after_an_incomplete_final_never_yields_a_smaller_complete_final() -> None:
    m = merger(partitions=2)
    m.add_partial(partial(0, spans=5), now_ms=0)
    m.add_progress(closed(0, W + SIZE))
    [first] = m.ready(now_ms=MAX_WAIT)
    assert not first.complete

    m.add_partial(partial(1, spans=2), now_ms=MAX_WAIT + 1)  # partition 1 finally speaks
    m.add_progress(closed(1, W + SIZE))
    later = m.ready(now_ms=2 * MAX_WAIT + 2)

    for final in later:
        assert final.aggregate.spans >= first.aggregate.spans
        if final.complete:
            assert final.aggregate.spans == 7


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="source_partitions"):
        RollupMerger(source_partitions=0, max_wait_ms=MAX_WAIT)


# --- the law: replays and delivery order do not change the finals -------------------------------


@settings(max_examples=150, deadline=None)
@given(
    counts=st.lists(st.lists(st.integers(0, 50), min_size=3, max_size=3), min_size=1, max_size=3),
    rng=st.randoms(use_true_random=False),
    replays=st.integers(0, 6),
)
def test_finals_do_not_depend_on_delivery_order_or_replays(
    counts: list[list[int]], rng: random.Random, replays: int
) -> None:
    partitions = len(counts)
    partials = [
        partial(source, spans=n, start=W + window * SIZE)
        for source, per_window in enumerate(counts)
        for window, n in enumerate(per_window)
    ]
    deliveries = partials + [rng.choice(partials) for _ in range(replays)]
    rng.shuffle(deliveries)

    m = RollupMerger(source_partitions=partitions, max_wait_ms=10**12)
    for item in deliveries:
        m.add_partial(item, now_ms=0)
    for source in range(partitions):
        m.add_progress(closed(source, W + 3 * SIZE))
    finals: list[FinalRollup] = m.ready(now_ms=0)

    assert [(f.window_start_ms, f.aggregate.spans, f.complete) for f in finals] == [
        (W + window * SIZE, sum(per_window[window] for per_window in counts), True)
        for window in range(3)
    ]
