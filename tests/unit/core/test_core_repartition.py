"""The repartition by trace id: a Collector batch splits into one piece per trace, every span
once, with its resource and scope; and a stage-0 replay's copies are dropped, exactly as the
first run dropped them, even after aggregate itself restarts from a checkpoint."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spanbuilder import request, resource_spans, span_pb, tid

from processor.core.partition import Checkpoint
from processor.core.repartition import (
    SourceMarks,
    parse_source_tag,
    source_tag,
    split_by_trace,
)


def test_a_batch_of_many_traces_splits_into_one_piece_per_trace_keyed_by_trace_id() -> None:
    batch = request(
        resource_spans(
            [span_pb(trace=1, span=1), span_pb(trace=2, span=2), span_pb(trace=1, span=3)],
            {"service.name": "planner"},
            scope="scope.a",
        ),
        resource_spans([span_pb(trace=2, span=4)], {"service.name": "coder"}, scope="scope.b"),
    )
    pieces = split_by_trace(batch)

    assert [p.key for p in pieces] == [tid(1).hex().encode(), tid(2).hex().encode()]
    assert [p.span_count for p in pieces] == [2, 2]
    first, second = (p.request for p in pieces)
    # trace 1: both spans under the one resource and scope they came with
    [group] = first.resource_spans
    assert group.resource == batch.resource_spans[0].resource
    assert group.schema_url == batch.resource_spans[0].schema_url
    [scope] = group.scope_spans
    assert scope.scope.name == "scope.a"
    assert [s.span_id for s in scope.spans] == [
        batch.resource_spans[0].scope_spans[0].spans[0].span_id,
        batch.resource_spans[0].scope_spans[0].spans[2].span_id,
    ]
    # trace 2: one span from each resource, each resource kept
    services = [g.resource.attributes[0].value.string_value for g in second.resource_spans]
    assert services == ["planner", "coder"]
    assert [g.scope_spans[0].scope.name for g in second.resource_spans] == ["scope.a", "scope.b"]


@settings(max_examples=60, deadline=None)
@given(layout=st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=8), min_size=1, max_size=4))
def test_every_span_lands_in_exactly_one_piece_of_its_own_trace(layout: list[list[int]]) -> None:
    span_ids = iter(range(1, 1000))
    batch = request(
        *(
            resource_spans([span_pb(trace=t, span=next(span_ids)) for t in traces])
            for traces in layout
        )
    )
    pieces = split_by_trace(batch)

    seen = []
    for piece in pieces:
        spans = [s for g in piece.request.resource_spans for sc in g.scope_spans for s in sc.spans]
        assert {s.trace_id.hex().encode() for s in spans} == {piece.key}
        assert piece.span_count == len(spans)
        seen.extend(s.span_id for s in spans)
    original = [s.span_id for g in batch.resource_spans for sc in g.scope_spans for s in sc.spans]
    assert sorted(seen) == sorted(original)
    assert len({p.key for p in pieces}) == len(pieces)


def test_spans_without_a_trace_id_travel_together_for_stage_1_to_dead_letter() -> None:
    batch = request(resource_spans([span_pb(trace=b"", span=1), span_pb(trace=b"", span=2)]))
    [piece] = split_by_trace(batch)
    assert piece.key == b"" and piece.span_count == 2


@pytest.mark.parametrize(
    ("tag", "parsed"),
    [
        (source_tag(3, 1200, 7), (3, (1200, 7))),
        (b"3:1200", None),
        (b"a:b:c", None),
        (b"-1:2:3", None),
        (b"\xff", None),
    ],
)
def test_source_tags_read_back_or_read_as_absent(
    tag: bytes, parsed: tuple[int, tuple[int, int]] | None
) -> None:
    assert parse_source_tag(tag) == parsed


def _run(marks: SourceMarks, log: list[tuple[int, int, tuple[int, int]]]) -> list[int]:
    """Offsets of the repartition topic whose piece is taken."""
    return [offset for offset, p, mark in log if marks.take(offset, p, mark)]


def test_a_stage_0_replay_sends_copies_that_are_dropped() -> None:
    # Source partition 0 sends pieces of offsets 10, 11, 12; the repartition crashes after 12 and
    # replays from 11: the copies of 11 and 12 come again, then 13 is new.
    log = [
        (0, 0, (10, 0)),
        (1, 0, (11, 0)),
        (2, 1, (5, 0)),  # another source partition interleaves
        (3, 0, (12, 0)),
        (4, 0, (11, 0)),
        (5, 0, (12, 0)),
        (6, 0, (13, 0)),
        (7, 1, (5, 0)),
    ]
    assert _run(SourceMarks(), log) == [0, 1, 2, 3, 6]


def test_a_checkpoint_carries_the_marks_as_of_its_offset_so_a_replay_drops_the_same() -> None:
    rng = random.Random(5)
    log: list[tuple[int, int, tuple[int, int]]] = []
    sent = {p: 0 for p in range(3)}
    for offset in range(300):
        p = rng.randrange(3)
        if rng.random() < 0.15 and sent[p] > 3:
            sent[p] -= rng.randint(1, 3)  # a stage-0 replay: back a few source offsets
        log.append((offset, p, (sent[p], 0)))
        sent[p] += 1
    first = SourceMarks()
    taken = _run(first, log)

    for restart_at in (0, 1, 57, 150, 299, 300):
        checkpoint = Checkpoint(restart_at, None, None, None, None, first.as_of(restart_at))
        again = Checkpoint.decode(restart_at, checkpoint.encode())
        assert again is not None and again.sources == checkpoint.sources
        replay = SourceMarks(again.sources)
        assert _run(replay, log[restart_at:]) == [o for o in taken if o >= restart_at]


def test_forgetting_history_before_a_checkpoint_keeps_later_answers() -> None:
    marks = SourceMarks()
    for offset in range(10):
        marks.take(offset, 0, (offset, 0))
    expected = marks.as_of(6)
    marks.forget_before(6)
    assert marks.as_of(6) == expected == ((0, 5, 0),)
    assert marks.as_of(10) == ((0, 9, 0),)


def test_a_checkpoint_without_repartition_encodes_as_before() -> None:
    checkpoint = Checkpoint(5, 1, 2, 3, 4)
    assert "sources" not in checkpoint.encode()
    assert Checkpoint.decode(5, checkpoint.encode()) == checkpoint
