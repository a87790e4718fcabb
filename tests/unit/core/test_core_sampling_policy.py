"""The sampling policy's checks and summary, attribute matching, the per-agent rate limit
driven by an injected event-time clock, and the span budget's slots."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from spanbuilder import attributes

from processor.core.sampling.budget import SpanBudget
from processor.core.sampling.policy import SamplingPolicy, matches_attributes
from processor.core.sampling.rate_limit import AgentRateLimiter
from processor.core.sampling.threshold import probability_to_threshold

# --- the policy ----------------------------------------------------------------------------------


def test_defaults_are_valid_and_derive_the_threshold() -> None:
    policy = SamplingPolicy()
    assert policy.threshold == probability_to_threshold(0.1)
    assert policy.summary() == "p=0.1; keep errors"


def test_summary_names_every_policy_in_one_line() -> None:
    policy = SamplingPolicy(
        probability=0.1,
        latency_threshold_ms=5_000,
        attribute_matches={"session.flagged": frozenset({"true"})},
        agent_spans_per_second=50,
        budget_spans_per_second=25,
    )
    assert policy.summary() == (
        "p=0.1; keep errors; latency>=5000ms; attr session.flagged in {true}; 50 spans/s/agent; "
        "budget 25 spans/s/partition"
    )


def test_summary_is_stable_and_short_for_long_value_lists() -> None:
    users = frozenset(f"user-{i:03d}" for i in range(100))
    one = SamplingPolicy(
        keep_errors=False, attribute_matches={"user.id": users, "a.b": frozenset("x")}
    )
    two = SamplingPolicy(
        keep_errors=False, attribute_matches={"a.b": frozenset("x"), "user.id": users}
    )
    assert one.summary() == two.summary()
    assert one.summary() == (
        "p=0.1; attr a.b in {x}; "
        "attr user.id in {user-000,user-001,user-002,user-003,user-004,... (+95 more)}"
    )


def test_attribute_values_are_normalised_to_frozensets() -> None:
    policy = SamplingPolicy(attribute_matches={"user.id": {"u1", "u2"}})  # type: ignore[dict-item]
    assert policy.attribute_matches == {"user.id": frozenset({"u1", "u2"})}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"probability": -0.01}, "probability must be from 0 to 1"),
        ({"probability": 1.5}, "probability must be from 0 to 1"),
        ({"probability": float("nan")}, "probability must be a number"),
        ({"probability": "0.1"}, "probability must be a number"),
        ({"probability": True}, "probability must be a number"),
        ({"keep_errors": "yes"}, "keep_errors must be true or false"),
        ({"latency_threshold_ms": -1}, "latency_threshold_ms must be a whole number >= 0"),
        ({"latency_threshold_ms": 1.5}, "latency_threshold_ms must be a whole number"),
        ({"attribute_matches": {"": frozenset({"x"})}}, "keys must be attribute names"),
        ({"attribute_matches": {"user.id": "u1"}}, "must be a set of strings"),
        ({"attribute_matches": {"user.id": frozenset({1})}}, "must be a set of strings"),
        ({"attribute_matches": {"user.id": frozenset()}}, "would match nothing"),
        ({"agent_spans_per_second": 0}, "agent_spans_per_second must be a number above 0"),
        ({"agent_spans_per_second": float("inf")}, "agent_spans_per_second"),
        ({"budget_spans_per_second": 0}, "budget_spans_per_second must be a number above 0"),
        ({"budget_spans_per_second": -2.5}, "budget_spans_per_second must be a number above 0"),
        ({"budget_spans_per_second": float("nan")}, "budget_spans_per_second"),
        ({"budget_spans_per_second": "25"}, "budget_spans_per_second"),
        ({"budget_spans_per_second": True}, "budget_spans_per_second"),
        ({"decision_grace_ms": -1}, "decision_grace_ms must be a whole number >= 0"),
        ({"decision_max_wait_ms": -5}, "decision_max_wait_ms"),
        ({"max_buffered_spans": 0}, "max_buffered_spans must be a whole number >= 1"),
        ({"max_buffered_traces": 0}, "max_buffered_traces must be a whole number >= 1"),
        ({"decision_cache_size": -1}, "decision_cache_size must be a whole number >= 0"),
    ],
)
def test_bad_settings_are_value_errors_that_say_what_is_wrong(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingPolicy(**kwargs)


def test_probability_zero_keeps_nothing_by_chance() -> None:
    assert SamplingPolicy(probability=0).threshold == 1 << 56


# --- attribute matching --------------------------------------------------------------------------

MATCHES = {
    "session.id": frozenset({"s-flagged"}),
    "session.flagged": frozenset({"true"}),
    "user.tier": frozenset({"3"}),
}


@pytest.mark.parametrize(
    ("attrs", "matched"),
    [
        ({"session.id": "s-flagged"}, True),
        ({"session.id": "s-other"}, False),
        ({"session.flagged": True}, True),  # a bool reads as "true"
        ({"session.flagged": "true"}, True),
        ({"session.flagged": False}, False),
        ({"user.tier": 3}, True),  # an int reads as its decimal form
        ({"user.tier": 3.0}, False),  # a double does not: "3.0" or "3"?
        ({"other": "s-flagged"}, False),
        ({"session.id": ["s-flagged"]}, False),  # arrays are not matched
        ({}, False),
    ],
)
def test_attribute_matching(attrs: dict[str, Any], matched: bool) -> None:
    assert matches_attributes(attributes(attrs), MATCHES) is matched


# --- the rate limit, in event time ---------------------------------------------------------------


def test_bucket_starts_full_and_refills_with_event_time() -> None:
    limiter = AgentRateLimiter(10)  # one second's worth: 10 spans
    now = 1_000_000
    assert [limiter.try_take("planner", now) for _ in range(11)] == [True] * 10 + [False]
    assert not limiter.try_take("planner", now + 99)  # 0.99 of a token
    assert limiter.try_take("planner", now + 100)
    assert limiter.try_take("searcher", now)  # another agent has its own bucket
    # a long pause refills to one second's worth, no more
    assert sum(limiter.try_take("planner", now + 60_000) for _ in range(50)) == 10


def test_a_clock_that_moves_back_refills_nothing() -> None:
    limiter = AgentRateLimiter(1)
    assert limiter.try_take("a", 10_000)
    assert not limiter.try_take("a", 5_000)
    assert not limiter.try_take("a", 10_999)
    assert limiter.try_take("a", 11_000)


def test_slow_rates_hold_at_least_one_span() -> None:
    limiter = AgentRateLimiter(0.5)
    assert limiter.capacity == 1
    assert limiter.try_take("a", 0)
    assert not limiter.try_take("a", 1_999)
    assert limiter.try_take("a", 2_000)


@pytest.mark.parametrize("rate", [0, -1, float("nan"), float("inf")])
def test_rate_must_be_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="spans_per_second"):
        AgentRateLimiter(rate)


@given(
    st.floats(min_value=0.1, max_value=500),
    st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=200),
)
def test_spans_taken_never_exceed_the_rate_plus_one_burst(rate: float, steps: list[int]) -> None:
    limiter = AgentRateLimiter(rate)
    now = 0
    taken = 0
    for step in steps:
        now += step
        taken += sum(limiter.try_take("a", now) for _ in range(5))
    assert taken <= limiter.capacity + rate * now / 1_000 + 1e-9


def test_many_agents_do_not_grow_the_buckets_without_bound() -> None:
    limiter = AgentRateLimiter(100)
    for i in range(5_000):
        limiter.try_take(f"agent-{i}", i * 1_000)  # each bucket is full again a second later
    assert limiter.agents <= 1_025


# --- the span budget's slots ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "slot_ms", "capacity"),
    [
        (25, 1_000, 25),
        (8.5, 1_000, 8.5),  # 100 spans/s over 12 partitions, say
        (1, 1_000, 1),
        (0.5, 2_000, 1),  # a slot holds at least one span
        (0.3, 3_334, 1.0002),
    ],
)
def test_a_slot_holds_one_second_of_the_budget_and_at_least_one_span(
    rate: float, slot_ms: int, capacity: float
) -> None:
    budget = SpanBudget(rate)
    assert (budget.slot_ms, budget.capacity) == (slot_ms, pytest.approx(capacity))


def test_a_slot_admits_while_it_has_room_and_a_new_second_starts_empty() -> None:
    budget = SpanBudget(2)
    second = budget.slot_of(1_700_000_000_500)
    budget.note(second, first_offset=7)
    assert budget.admits(second)
    budget.charge(second, 1)
    assert budget.admits(second)  # 1 of 2 used: room for one more trace, of any size
    budget.charge(second, 5)
    assert not budget.admits(second)
    assert budget.used(second) == 6
    assert budget.admits(budget.slot_of(1_700_000_001_000))


def test_a_slot_notes_the_first_offset_a_replay_must_start_at_to_fill_it_again() -> None:
    budget = SpanBudget(10)
    budget.note(5, first_offset=40)
    budget.note(5, first_offset=12)
    budget.note(5, first_offset=30)
    budget.note(7, first_offset=3)
    assert budget.first_offset(5) == 12
    assert budget.min_first_offset(None) == 3
    assert budget.min_first_offset(6_000) == 3  # slots from 6 s on: slot 7
    assert budget.min_first_offset(8_000) is None
    budget.forget_before(6_500)  # slot 5 goes; slot 6 would stay (not wholly before)
    assert budget.slots == 1
    assert budget.first_offset(5) is None
    budget.charge(5)  # a forgotten slot takes nothing
    assert budget.slots == 1


@pytest.mark.parametrize("rate", [0, -1, float("nan"), float("inf"), True])
def test_budget_must_be_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="spans_per_second"):
        SpanBudget(rate)
