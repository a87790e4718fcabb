"""The latency sketch: 1% relative error against exact order statistics, exact merges."""

from __future__ import annotations

import math
import random

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.core.sketch import RELATIVE_ACCURACY, LatencySketch

QUANTILES = (0.0, 0.01, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0)
# the guarantee, plus room for floating-point rounding in the logarithm
TOLERANCE = RELATIVE_ACCURACY * (1 + 1e-9)


def lower_order_statistic(values: list[float], q: float) -> float:
    """The exact value the sketch approximates: ``sorted(v)[floor(q * (n - 1))]``."""
    return sorted(values)[math.floor(q * (len(values) - 1))]


def sketch_of(values: list[float]) -> LatencySketch:
    sketch = LatencySketch()
    for value in values:
        sketch.add(value)
    return sketch


def assert_within_guarantee(sketch: LatencySketch, values: list[float]) -> None:
    for q in QUANTILES:
        exact = lower_order_statistic(values, q)
        estimate = sketch.quantile(q)
        assert estimate is not None
        if exact == 0:
            assert estimate == 0, q
        else:
            assert abs(estimate - exact) <= TOLERANCE * exact, (q, exact, estimate)


def distribution(name: str, rng: random.Random, n: int) -> list[float]:
    """Latencies in milliseconds, from tame to very heavy-tailed."""
    if name == "uniform":
        return [rng.uniform(1, 1_000) for _ in range(n)]
    if name == "lognormal-sigma-3":
        return [rng.lognormvariate(3, 3) for _ in range(n)]
    if name == "lognormal-sigma-6":
        return [rng.lognormvariate(0, 6) for _ in range(n)]
    if name == "pareto-1.1":
        return [rng.paretovariate(1.1) for _ in range(n)]
    if name == "pareto-0.5":  # no finite mean
        return [rng.paretovariate(0.5) for _ in range(n)]
    if name == "sub-millisecond":
        return [rng.randint(1, 999) / 1e6 for _ in range(n)]  # 1..999 ns
    if name == "with-zeros":
        return [0.0 if rng.random() < 0.3 else rng.expovariate(0.01) for _ in range(n)]
    if name == "bimodal":
        return [
            rng.gauss(5, 1) ** 2 if rng.random() < 0.9 else rng.uniform(5e3, 6e4) for _ in range(n)
        ]
    raise AssertionError(name)


DISTRIBUTIONS = [
    "uniform",
    "lognormal-sigma-3",
    "lognormal-sigma-6",
    "pareto-1.1",
    "pareto-0.5",
    "sub-millisecond",
    "with-zeros",
    "bimodal",
]


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(DISTRIBUTIONS),
    seed=st.integers(0, 2**32),
    n=st.integers(1, 3_000),
)
def test_quantiles_are_within_one_percent_of_the_exact_lower_order_statistic(
    name: str, seed: int, n: int
) -> None:
    values = distribution(name, random.Random(seed), n)
    assert_within_guarantee(sketch_of(values), values)


# what the aggregate feeds it: integer nanoseconds as milliseconds, up to ~11 days
latencies_ms = st.integers(0, 10**15).map(lambda ns: ns / 1e6)


@settings(max_examples=200, deadline=None)
@given(st.lists(latencies_ms, min_size=1, max_size=200))
def test_quantiles_are_within_one_percent_for_any_latencies(values: list[float]) -> None:
    assert_within_guarantee(sketch_of(values), values)


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 0.5, None),
        ([0.0], 0.5, 0.0),
        ([0.0, 0.0, 5.0], 0.5, 0.0),
        ([0.0, 0.0, 5.0], 1.0, pytest.approx(5.0, rel=RELATIVE_ACCURACY)),
        ([7.0], 0.0, pytest.approx(7.0, rel=RELATIVE_ACCURACY)),
        ([7.0], 0.99, pytest.approx(7.0, rel=RELATIVE_ACCURACY)),
        # the lower rule: the median of 1..4 is the 2nd value, not 2.5
        ([1.0, 2.0, 3.0, 4.0], 0.5, pytest.approx(2.0, rel=RELATIVE_ACCURACY)),
        ([1.0, 2.0, 3.0, 4.0], 0.99, pytest.approx(3.0, rel=RELATIVE_ACCURACY)),
        ([float(n) for n in range(1, 101)], 0.95, pytest.approx(95.0, rel=RELATIVE_ACCURACY)),
    ],
)
def test_quantile_table(values: list[float], q: float, expected: object) -> None:
    assert sketch_of(values).quantile(q) == expected


@pytest.mark.parametrize("q", [-0.01, 1.01, math.nan])
def test_a_quantile_outside_zero_to_one_is_refused(q: float) -> None:
    with pytest.raises(ValueError, match="quantile"):
        sketch_of([1.0]).quantile(q)


values_lists = st.lists(latencies_ms, max_size=60)


@settings(max_examples=200, deadline=None)
@given(st.lists(values_lists, min_size=1, max_size=5), st.randoms(use_true_random=False))
def test_merging_in_any_order_equals_adding_everything_to_one(
    parts: list[list[float]], rng: random.Random
) -> None:
    whole = sketch_of([v for part in parts for v in part])
    sketches = [sketch_of(part) for part in parts]
    rng.shuffle(sketches)
    merged = LatencySketch()
    for sketch in sketches:
        merged.merge(sketch)
    assert merged.to_state() == whole.to_state()
    assert merged.count == whole.count == sum(map(len, parts))


@settings(max_examples=200, deadline=None)
@given(values_lists)
def test_state_round_trips_through_json(values: list[float]) -> None:
    sketch = sketch_of(values)
    state = orjson.loads(orjson.dumps(sketch.to_state()))
    restored = LatencySketch.from_state(state)
    assert restored.to_state() == sketch.to_state()
    assert restored.count == len(values)
    assert [restored.quantile(q) for q in QUANTILES] == [sketch.quantile(q) for q in QUANTILES]


def test_the_state_does_not_depend_on_the_order_values_came_in() -> None:
    values = [float(n % 97) * 1.7 for n in range(1_000)]
    shuffled = list(values)
    random.Random(3).shuffle(shuffled)
    assert orjson.dumps(sketch_of(values).to_state()) == orjson.dumps(
        sketch_of(shuffled).to_state()
    )
