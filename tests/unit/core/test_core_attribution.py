"""Agent attribution: which agent a span counts for, which spans are invocations, and the law
that every span added comes out exactly once, whatever the arrival order and the bounds."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spanbuilder import T0_MS, record

from processor.core.attribution import AttributedSpan, TraceAssembler
from processor.core.spans import SpanRecord

FAR_FUTURE_MS = T0_MS + 10**9


def by_span(out: list[AttributedSpan]) -> dict[int, AttributedSpan]:
    found = {int.from_bytes(item.span.span_id, "big"): item for item in out}
    assert len(found) == len(out), "a span came out twice"
    return found


def attribute_all(spans: list[SpanRecord], **limits: int) -> dict[int, AttributedSpan]:
    """Add spans one call each, in the given order, then let everything out."""
    assembler = TraceAssembler(**limits)
    out: list[AttributedSpan] = []
    for offset, span in enumerate(spans):
        out += assembler.add(span, offset)
    out += assembler.expire(FAR_FUTURE_MS)
    return by_span(out)


# --- the agent rule ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spans", "expected"),
    [
        pytest.param([record(span=1, agent="planner")], {1: ("planner", True)}, id="own-agent"),
        pytest.param(
            [record(span=1, agent="planner"), record(span=2, parent=1)],
            {1: ("planner", True), 2: ("planner", False)},
            id="inherits-parent",
        ),
        pytest.param(
            [record(span=1, agent="planner"), record(span=2, parent=1), record(span=3, parent=2)],
            {1: ("planner", True), 2: ("planner", False), 3: ("planner", False)},
            id="nearest-ancestor-two-up",
        ),
        pytest.param(
            [
                record(span=1, agent="planner"),
                record(span=2, parent=1, agent="searcher"),
                record(span=3, parent=2),
            ],
            {1: ("planner", True), 2: ("searcher", True), 3: ("searcher", False)},
            id="nearest-not-farthest",
        ),
        pytest.param(
            [record(span=1, service="travel"), record(span=2, parent=1, service="travel")],
            {1: ("travel", True), 2: ("travel", False)},
            id="service-name-fallback",
        ),
        pytest.param(
            [record(span=1, service=None), record(span=2, parent=1, service=None)],
            {1: ("unknown", True), 2: ("unknown", False)},
            id="unknown",
        ),
        pytest.param(
            # Only agent attributes flow down: a span in another service with no agent above it
            # takes its own service's name, and is that service's invocation.
            [record(span=1, service="gateway"), record(span=2, parent=1, service="search-svc")],
            {1: ("gateway", True), 2: ("search-svc", True)},
            id="service-name-does-not-flow-down",
        ),
        pytest.param(
            [
                record(span=1, agent="planner", service="gateway"),
                record(span=2, parent=1, service="search-svc"),
            ],
            {1: ("planner", True), 2: ("planner", False)},
            id="ancestor-agent-beats-own-service",
        ),
        pytest.param(
            [
                record(span=1, agent="planner"),
                record(span=2, parent=1, agent="searcher"),
                record(span=3, parent=2, agent="planner"),
            ],
            {1: ("planner", True), 2: ("searcher", True), 3: ("planner", True)},
            id="agent-called-back",
        ),
        pytest.param(
            [record(span=1, agent="planner"), record(span=2, parent=1, agent="planner")],
            {1: ("planner", True), 2: ("planner", False)},
            id="same-agent-child-is-no-invocation",
        ),
    ],
)
@pytest.mark.parametrize("order", ["parents-first", "children-first"])
def test_agent_and_invocation_rule(
    spans: list[SpanRecord], expected: dict[int, tuple[str, bool]], order: str
) -> None:
    arriving = spans if order == "parents-first" else spans[::-1]
    got = attribute_all(arriving)
    assert {n: (item.agent, item.is_invocation) for n, item in got.items()} == expected


def test_children_wait_for_their_parent_across_add_calls() -> None:
    assembler = TraceAssembler()
    grandchild = record(span=3, parent=2, llm=True)
    child = record(span=2, parent=1)
    root = record(span=1, agent="planner")

    assert assembler.add(grandchild, offset=10) == []
    assert assembler.add(child, offset=11) == []
    assert assembler.stats.pending_spans == 2
    assert assembler.min_pending_offset() == 10
    out = assembler.add(root, offset=12)

    assert {item.span.span_id[-1]: item.agent for item in out} == {
        1: "planner",
        2: "planner",
        3: "planner",
    }
    assert [item.offset for item in sorted(out, key=lambda i: i.offset)] == [10, 11, 12]
    assert assembler.stats.pending_spans == 0
    assert assembler.min_pending_offset() is None
    assert assembler.stats.resolved_without_parent == 0


def test_a_parent_that_never_comes_is_given_up_after_the_wait_and_counted() -> None:
    assembler = TraceAssembler(attribution_wait_ms=1_000)
    orphan = record(span=2, parent=1, end_ms=T0_MS, agent="searcher")
    assert assembler.add(orphan, 0) == []
    assert assembler.earliest_pending_end_ms() == T0_MS

    assert assembler.expire(T0_MS + 999) == []  # still within the wait
    [out] = assembler.expire(T0_MS + 1_000)

    assert (out.agent, out.is_invocation) == ("searcher", True)
    assert assembler.stats.resolved_without_parent == 1
    assert assembler.earliest_pending_end_ms() is None


def test_a_span_whose_wait_ends_first_still_gets_its_waiting_parents_agent() -> None:
    # Regression: the LLM span ends (and its wait ends) before its agent span; both wait for
    # a root that never comes. The LLM span must still count for the agent above it.
    assembler = TraceAssembler(attribution_wait_ms=1_000)
    llm = record(span=3, parent=2, end_ms=T0_MS + 100, service="svc", llm=True)
    agent_span = record(span=2, parent=1, end_ms=T0_MS + 5_000, agent="researcher")
    assembler.add(llm, 0)
    assembler.add(agent_span, 1)

    got = by_span(assembler.expire(T0_MS + 1_100))  # past the LLM span's wait only

    assert {n: (item.agent, item.is_invocation) for n, item in got.items()} == {
        2: ("researcher", True),
        3: ("researcher", False),
    }
    assert assembler.stats.resolved_without_parent == 1
    assert assembler.stats.pending_spans == 0


def test_evicting_a_trace_decides_its_waiting_spans_at_once_and_counts_it() -> None:
    assembler = TraceAssembler(max_traces=2)
    child = record(trace=1, span=2, parent=1, agent="a")
    grandchild = record(trace=1, span=3, parent=2)
    assembler.add(grandchild, 0)
    assembler.add(child, 1)
    assembler.add(record(trace=2, span=10), 2)

    out = assembler.add(record(trace=3, span=20), 3)  # the third trace pushes out the first

    got = by_span(out)
    assert {n: (item.agent, item.is_invocation) for n, item in got.items()} == {
        2: ("a", True),
        3: ("a", False),
        20: ("svc", True),
    }
    assert assembler.stats.evicted_traces == 1
    assert assembler.stats.resolved_without_parent == 1
    assert assembler.trace_count == 2


def test_the_least_recently_touched_trace_is_evicted() -> None:
    assembler = TraceAssembler(max_traces=2)
    assembler.add(record(trace=1, span=2, parent=1), 0)
    assembler.add(record(trace=2, span=3, parent=9), 1)
    assembler.add(record(trace=1, span=4, parent=1), 2)  # touches trace 1 again

    out = assembler.add(record(trace=3, span=5), 3)

    assert sorted(item.span.span_id[-1] for item in out) == [3, 5]


def test_the_span_limit_bounds_the_buffer() -> None:
    assembler = TraceAssembler(max_spans=5)
    out: list[AttributedSpan] = []
    for n in range(1, 21):
        out += assembler.add(record(trace=n, span=n, parent=100 + n), n)
        assert assembler.spans_held <= 5
    out += assembler.expire(FAR_FUTURE_MS)
    assert len(by_span(out)) == 20
    assert assembler.stats.evicted_traces == 15


def test_a_cycle_of_parent_ids_does_not_hang_and_loses_nothing() -> None:
    assembler = TraceAssembler()
    assert assembler.add(record(span=1, parent=2), 0) == []
    assert assembler.add(record(span=2, parent=1), 1) == []
    assert assembler.add(record(span=3, parent=3), 2) == []

    assert sorted(by_span(assembler.expire(FAR_FUTURE_MS))) == [1, 2, 3]
    assert assembler.stats.pending_spans == 0


def test_a_duplicate_span_comes_out_as_often_as_it_went_in() -> None:
    assembler = TraceAssembler()
    out = assembler.add(record(span=2, parent=1), 0)
    out += assembler.add(record(span=2, parent=1), 1)
    out += assembler.add(record(span=1), 2)
    out += assembler.expire(FAR_FUTURE_MS)
    assert Counter(item.span.span_id[-1] for item in out) == {2: 2, 1: 1}


def test_a_late_child_of_a_forgotten_trace_still_comes_out() -> None:
    assembler = TraceAssembler(attribution_wait_ms=1_000, trace_ttl_ms=10_000)
    assert len(assembler.add(record(span=1, agent="planner", end_ms=T0_MS), 0)) == 1
    assembler.expire(T0_MS + 10_000)
    assert assembler.trace_count == 0

    assert assembler.add(record(span=2, parent=1, end_ms=T0_MS), 1) == []
    [late] = assembler.expire(T0_MS + 20_000)
    assert (late.agent, late.is_invocation) == ("svc", True)


def test_attribution_stays_right_with_ever_new_agent_names() -> None:
    # Resolved spans share one (agent, lineage) tuple per distinct pair, from a bounded table
    # that starts over when full: thousands of agent names must not change any answer.
    traces = 6_000
    spans: list[SpanRecord] = []
    for index in range(traces):
        spans += [
            record(trace=index, span=3, parent=2, service=f"svc-{index % 7}"),
            record(trace=index, span=2, parent=1),
            record(trace=index, span=1, agent=f"agent-{index}"),
            record(trace=index, span=4, service=f"svc-{index % 7}"),  # no agent anywhere above
        ]
    assembler = TraceAssembler(max_traces=traces)
    out: list[AttributedSpan] = []
    for offset, span in enumerate(spans):
        out += assembler.add(span, offset)
    out += assembler.expire(FAR_FUTURE_MS)
    found = {(item.span.trace_id, item.span.span_id[-1]): item for item in out}
    assert len(found) == len(spans) == len(out)
    for index in range(traces):
        trace = spans[4 * index].trace_id
        agents = {n: (found[trace, n].agent, found[trace, n].is_invocation) for n in (1, 2, 3, 4)}
        assert agents == {
            1: (f"agent-{index}", True),
            2: (f"agent-{index}", False),
            3: (f"agent-{index}", False),
            4: (f"svc-{index % 7}", True),
        }


@pytest.mark.parametrize(
    "kwargs",
    [{"max_traces": 0}, {"max_spans": 0}, {"attribution_wait_ms": -1}, {"trace_ttl_ms": -1}],
)
def test_bad_limits_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must"):
        TraceAssembler(**kwargs)


# --- the laws, over random trace trees and arrival orders ---------------------------------------


@dataclass(frozen=True)
class Forest:
    spans: list[SpanRecord]
    order: list[int]


@st.composite
def forests(draw: st.DrawFn) -> Forest:
    """Up to four traces of random trees; some parents never arrive; any arrival order."""
    count = draw(st.integers(1, 40))
    spans: list[SpanRecord] = []
    for n in range(1, count + 1):
        trace = draw(st.integers(1, 4))
        earlier = [s for s in spans if s.trace_id[-1] == trace]
        parent_kind = draw(st.sampled_from(["root", "tree", "tree", "tree", "missing"]))
        parent: int | None = None
        if parent_kind == "tree" and earlier:
            parent = draw(st.sampled_from(earlier)).span_id[-1]
        elif parent_kind == "missing":
            parent = 200 + n  # an id no span has
        spans.append(
            record(
                trace=trace,
                span=n,
                parent=parent,
                end_ms=T0_MS + draw(st.integers(0, 3_000)),
                agent=draw(st.sampled_from([None, None, "a", "b"])),
                service=draw(st.sampled_from(["s1", "s2", None])),
            )
        )
    order = draw(st.permutations(range(count)))
    return Forest(spans, list(order))


def reference_attribution(spans: list[SpanRecord]) -> dict[int, tuple[str, bool]]:
    """The documented rule, computed directly on the whole forest."""
    index = {(s.trace_id, s.span_id): s for s in spans}

    def parent_of(span: SpanRecord) -> SpanRecord | None:
        return index.get((span.trace_id, span.parent_span_id)) if span.parent_span_id else None

    def agent_of(span: SpanRecord) -> str:
        current: SpanRecord | None = span
        while current is not None:
            if current.own_agent:
                return current.own_agent
            current = parent_of(current)
        return span.service_name or "unknown"

    result = {}
    for span in spans:
        parent = parent_of(span)
        agent = agent_of(span)
        result[span.span_id[-1]] = (agent, parent is None or agent_of(parent) != agent)
    return result


@settings(max_examples=100, deadline=None)
@given(forests())
def test_with_room_to_wait_attribution_follows_the_rule_in_any_arrival_order(
    forest: Forest,
) -> None:
    arriving = [forest.spans[i] for i in forest.order]
    got = attribute_all(arriving)
    assert {n: (item.agent, item.is_invocation) for n, item in got.items()} == (
        reference_attribution(forest.spans)
    )


@settings(max_examples=100, deadline=None)
@given(
    forest=forests(),
    max_traces=st.integers(1, 4),
    max_spans=st.integers(1, 30),
    wait_ms=st.integers(0, 2_000),
    ttl_ms=st.integers(0, 5_000),
    expiries=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 500)), max_size=6),
)
def test_every_span_comes_out_exactly_once_under_any_bounds(
    forest: Forest,
    max_traces: int,
    max_spans: int,
    wait_ms: int,
    ttl_ms: int,
    expiries: list[tuple[int, int]],
) -> None:
    assembler = TraceAssembler(
        max_traces=max_traces,
        max_spans=max_spans,
        attribution_wait_ms=wait_ms,
        trace_ttl_ms=ttl_ms,
    )
    expire_after = dict(expiries)  # after the n-th add, expire at a rising watermark
    out: list[AttributedSpan] = []
    watermark = T0_MS
    for step, i in enumerate(forest.order):
        out += assembler.add(forest.spans[i], offset=step)
        assert assembler.trace_count <= max_traces
        assert assembler.spans_held <= max_spans
        if step in expire_after:
            watermark += expire_after[step] * 10
            out += assembler.expire(watermark)
    out += assembler.expire(FAR_FUTURE_MS)

    assert Counter(id(item.span) for item in out) == Counter(id(s) for s in forest.spans)
    assert assembler.stats.pending_spans == 0
    assert assembler.min_pending_offset() is None
    assert assembler.trace_count == 0 and assembler.spans_held == 0
    for item in out:
        # whatever was decided early, the agent is one the rule could give
        assert item.agent in {"a", "b", "s1", "s2", "unknown"}
        assert item.offset == forest.order.index(forest.spans.index(item.span))


# --- copies: a span delivered twice -----------------------------------------------------------


@pytest.mark.parametrize("order", ["parents-first", "children-first"])
def test_a_copy_comes_out_once_marked_duplicate_with_its_originals_agent(order: str) -> None:
    """The child inherits its agent; its copy names the same agent, whether the original was
    resolved when the copy came (parents first) or still waited for its parent."""
    parent = record(span=1, agent="planner")
    child = record(span=2, parent=1)
    copy = record(span=2, parent=1)
    arriving = [parent, child, copy] if order == "parents-first" else [child, copy, parent]
    assembler = TraceAssembler()
    out: list[AttributedSpan] = []
    for offset, span in enumerate(arriving):
        out += assembler.add(span, offset)
    out += assembler.expire(FAR_FUTURE_MS)

    assert [(item.span, item.agent, item.duplicate) for item in out if item.duplicate] == [
        (copy, "planner", True)
    ]
    assert {id(item.span) for item in out} == {id(parent), id(child), id(copy)}
    assert assembler.spans_held == 0


def test_a_copy_of_a_span_whose_trace_was_forgotten_is_a_span_again() -> None:
    assembler = TraceAssembler(trace_ttl_ms=1_000)
    assembler.add(record(span=1, end_ms=T0_MS), 0)
    assembler.expire(T0_MS + 1_000)  # the TTL after the trace's last end: forgotten
    [again] = assembler.add(record(span=1, end_ms=T0_MS), 1)
    assert not again.duplicate


@settings(max_examples=150, deadline=None)
@given(
    spans=st.lists(
        st.tuples(st.integers(1, 3), st.integers(1, 6), st.sampled_from([None, 1, 2, 3, 4])),
        max_size=30,
    ),
    max_traces=st.integers(1, 4),
)
def test_every_span_added_comes_out_once_and_only_first_copies_count(
    spans: list[tuple[int, int, int | None]], max_traces: int
) -> None:
    """Ids repeat often here: every span comes out once; one not marked duplicate per distinct
    (trace, span) id while the trace stays in the buffer, so never fewer than distinct ids."""
    assembler = TraceAssembler(max_traces=max_traces)
    records = [record(trace=t, span=s, parent=p if p != s else None) for t, s, p in spans]
    out: list[AttributedSpan] = []
    for offset, span in enumerate(records):
        out += assembler.add(span, offset)
    out += assembler.expire(FAR_FUTURE_MS)

    assert sorted(id(item.span) for item in out) == sorted(id(span) for span in records)
    firsts = [item for item in out if not item.duplicate]
    distinct = {(span.trace_id, span.span_id) for span in records}
    assert len(firsts) >= len(distinct)
    if max_traces >= 3:  # nothing evicted: exactly one first per id
        assert len(firsts) == len(distinct)
    assert assembler.spans_held == 0
