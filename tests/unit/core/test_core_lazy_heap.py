"""The lazy heap behind "earliest end still held" and "past its TTL": it answers as a scan of
the live values would, however often values move and keys go, and its size stays bounded."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from processor.core.lazy_heap import LazyHeap

# (key, value): set the key's value; (key, None): the key goes
_ops = st.lists(
    st.tuples(st.integers(0, 20), st.one_of(st.none(), st.integers(0, 1_000))), max_size=300
)


def heap_over(values: dict[int, int]) -> LazyHeap[int, int]:
    return LazyHeap(values, lambda value: value)


def apply(
    values: dict[int, int], heap: LazyHeap[int, int], ops: list[tuple[int, int | None]]
) -> None:
    for key, value in ops:
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
            heap.push(value, key)


@given(ops=_ops)
def test_peek_is_the_smallest_live_value(ops: list[tuple[int, int | None]]) -> None:
    values: dict[int, int] = {}
    heap = heap_over(values)
    for step in range(len(ops)):
        apply(values, heap, ops[step : step + 1])
        assert heap.peek() == (min(values.values()) if values else None)


@given(ops=_ops, limit=st.integers(0, 1_000))
def test_pop_through_takes_each_live_key_at_or_below_the_limit_once_smallest_first(
    ops: list[tuple[int, int | None]], limit: int
) -> None:
    values: dict[int, int] = {}
    heap = heap_over(values)
    apply(values, heap, ops)
    expected = sorted((v, k) for k, v in values.items() if v <= limit)
    taken = []
    for key in heap.pop_through(limit):
        taken.append((values[key], key))
        del values[key]  # the owner drops the key as it goes
    assert taken == expected
    assert heap.peek() == (min(values.values()) if values else None)


def test_stale_entries_are_rebuilt_away() -> None:
    values: dict[int, int] = {}
    heap = heap_over(values)
    for value in range(100_000):  # one key whose value keeps moving on
        values[1] = value
        heap.push(value, 1)
    assert len(heap) <= 4 * len(values) + 1_024 + 1
    assert heap.peek() == 99_999
