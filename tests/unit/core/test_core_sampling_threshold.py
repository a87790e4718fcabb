"""OpenTelemetry consistent probability sampling: thresholds, th/rv values and the tracestate,
checked against the specification's own examples and tables."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor.core.sampling.threshold import (
    MAX_ADJUSTED_COUNT,
    NEVER_SAMPLE_THRESHOLD,
    adjusted_count,
    probability_to_threshold,
    rv_to_randomness,
    th_to_threshold,
    threshold_probability,
    threshold_to_th,
    trace_id_randomness,
)
from processor.core.sampling.tracestate import (
    OtelTraceState,
    parse_tracestate,
    with_threshold,
)

thresholds = st.integers(min_value=0, max_value=MAX_ADJUSTED_COUNT - 1)


def th_of(probability: float, precision: int | None = None) -> str:
    return threshold_to_th(probability_to_threshold(probability, precision))


# --- probability -> th ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probability", "th"),
    [
        (1.0, "0"),
        (0.5, "8"),
        (0.25, "c"),
        (0.125, "e"),
        (0.0625, "f"),
        # the specification's 1% example: (1 - 0.01) * 2**56 ~ 0xfd70a3d70a3d70...
        (0.01, "fd70a3d70a3d71"),
        (0.1, "e6666666666666"),
        (1 / 3, "aaaaaaaaaaaaac"),
        (2**-56, "ffffffffffffff"),
    ],
)
def test_full_precision_th(probability: float, th: str) -> None:
    assert th_of(probability) == th


# The specification's table "1-in-N probability sampling, with precision 3, 4, and 5".
SPEC_TABLE = [
    (1, ("0", "0", "0")),
    (0.5, ("8", "8", "8")),
    (1 / 3, ("aab", "aaab", "aaaab")),
    (0.25, ("c", "c", "c")),
    (0.2, ("ccd", "cccd", "ccccd")),
    (0.125, ("e", "e", "e")),
    (0.1, ("e66", "e666", "e6666")),
    (0.0625, ("f", "f", "f")),
    (0.01, ("fd71", "fd70a", "fd70a4")),
    (0.001, ("ffbe7", "ffbe77", "ffbe76d")),
    (0.0001, ("fff972", "fff9724", "fff97247")),
    (0.00001, ("ffff584", "ffff583a", "ffff583a5")),
    (0.000001, ("ffffef4", "ffffef39", "ffffef391")),
]


@pytest.mark.parametrize(("probability", "expected"), SPEC_TABLE)
def test_reduced_precision_matches_the_specification_table(
    probability: float, expected: tuple[str, str, str]
) -> None:
    assert tuple(th_of(probability, precision) for precision in (3, 4, 5)) == expected


@pytest.mark.parametrize(
    ("probability", "adjusted"),
    [(1, 1.0), (0.5, 2.0), (0.25, 4.0), (0.1, 10.0), (0.01, 100.0)],
)
def test_adjusted_count_is_the_inverse_probability(probability: float, adjusted: float) -> None:
    threshold = probability_to_threshold(probability)
    assert adjusted_count(threshold) == pytest.approx(adjusted, rel=1e-12)
    assert threshold_probability(threshold) == pytest.approx(probability, rel=1e-12)


def test_spec_adjusted_counts_at_precision_four() -> None:
    # "Exact Adjusted Count" column of the table, precision 4
    assert adjusted_count(probability_to_threshold(0.1, 4)) == pytest.approx(9.99938968568813)
    assert adjusted_count(probability_to_threshold(1 / 3, 4)) == pytest.approx(3.00004577706569)


def test_tiny_probabilities_never_sample_and_have_no_th() -> None:
    assert probability_to_threshold(0.0) == NEVER_SAMPLE_THRESHOLD
    assert probability_to_threshold(2**-58) == NEVER_SAMPLE_THRESHOLD
    with pytest.raises(ValueError, match="2\\*\\*56"):
        threshold_to_th(NEVER_SAMPLE_THRESHOLD)
    with pytest.raises(ValueError, match="no item is kept"):
        adjusted_count(NEVER_SAMPLE_THRESHOLD)


@pytest.mark.parametrize("probability", [-0.1, 1.0001, float("nan"), float("inf")])
def test_probability_out_of_range_is_a_value_error(probability: float) -> None:
    with pytest.raises(ValueError, match="probability"):
        probability_to_threshold(probability)


@pytest.mark.parametrize("precision", [0, 15])
def test_precision_out_of_range_is_a_value_error(precision: int) -> None:
    with pytest.raises(ValueError, match="precision"):
        probability_to_threshold(0.1, precision)


@given(st.floats(min_value=2**-56, max_value=1.0), st.integers(min_value=1, max_value=14))
def test_reduced_precision_stays_close_and_in_range(probability: float, precision: int) -> None:
    exact = probability_to_threshold(probability)
    rounded = probability_to_threshold(probability, precision)
    assert 0 <= rounded < MAX_ADJUSTED_COUNT
    assert len(threshold_to_th(rounded)) <= 14
    # within half a unit of the last digit kept (the leading-f digits add precision)
    assert abs(rounded - exact) <= (1 << (4 * (14 - precision))) // 2


# --- th and rv values ----------------------------------------------------------------------------


@given(thresholds)
def test_th_round_trips_and_is_canonical(threshold: int) -> None:
    th = threshold_to_th(threshold)
    assert th_to_threshold(th) == threshold
    assert 1 <= len(th) <= 14
    assert th == th.lower()
    assert th == "0" or not th.endswith("0")


@pytest.mark.parametrize(
    ("value", "threshold"),
    [
        ("0", 0),
        ("8", 1 << 55),
        ("c", 3 << 54),
        ("fd70a4", 0xFD70A400000000),
        ("00ff", 0x00FF0000000000),  # leading zeros are digits: a threshold near 0
        ("E666", 0xE6660000000000),  # the th grammar allows upper-case hex
        ("ffffffffffffff", MAX_ADJUSTED_COUNT - 1),
    ],
)
def test_th_values_decode_with_implicit_trailing_zeros(value: str, threshold: int) -> None:
    assert th_to_threshold(value) == threshold


@pytest.mark.parametrize("value", ["", "fffffffffffffff", "g", "0x8", "8_0", " 8", "-1"])
def test_invalid_th_values_read_as_absent(value: str) -> None:
    assert th_to_threshold(value) is None


@pytest.mark.parametrize(
    ("value", "randomness"),
    [
        ("6e6d1a75832a2f", 0x6E6D1A75832A2F),  # the specification's example
        ("00000000000000", 0),
        ("ffffffffffffff", MAX_ADJUSTED_COUNT - 1),
        ("6e6d1a75832a2", None),  # 13 digits
        ("6e6d1a75832a2f0", None),  # 15 digits
        ("6E6D1A75832A2F", None),  # rv MUST be lower-case
    ],
)
def test_rv_values(value: str, randomness: int | None) -> None:
    assert rv_to_randomness(value) == randomness


def test_trace_id_randomness_is_the_last_seven_bytes() -> None:
    trace_id = bytes.fromhex("0102030405060708" + "096e6d1a75832a2f")
    assert trace_id_randomness(trace_id) == 0x6E6D1A75832A2F


# --- the tracestate's ot entry -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tracestate", "expected"),
    [
        ("", OtelTraceState()),
        ("vendor=abc", OtelTraceState()),
        ("ot=th:0", OtelTraceState(threshold=0)),
        ("ot=th:c", OtelTraceState(threshold=3 << 54)),
        ("ot=rv:6e6d1a75832a2f", OtelTraceState(randomness=0x6E6D1A75832A2F)),
        (
            "a=1, ot=rv:6e6d1a75832a2f;th:8;foo:bar ,b=2",
            OtelTraceState(threshold=1 << 55, randomness=0x6E6D1A75832A2F),
        ),
        ("ot=th:xyz;rv:short", OtelTraceState()),  # invalid values read as absent
        ("ot=th:8;th:c", OtelTraceState(threshold=1 << 55)),  # duplicate key: first counts
        ("foot=th:8", OtelTraceState()),  # another vendor's key that ends in "ot"
        ("ot=p:8;r:62", OtelTraceState()),  # sub-keys of other concerns
    ],
)
def test_parse_tracestate(tracestate: str, expected: OtelTraceState) -> None:
    assert parse_tracestate(tracestate) == expected


@pytest.mark.parametrize(
    ("tracestate", "threshold", "expected"),
    [
        ("", 0, "ot=th:0"),
        ("", 1 << 55, "ot=th:8"),
        ("vendor=abc", 1 << 55, "ot=th:8,vendor=abc"),
        # th replaced, rv and other sub-keys kept, the ot member moves to the front
        (
            "a=1,ot=rv:6e6d1a75832a2f;th:c;k1:13,b=2",
            1 << 55,
            "ot=rv:6e6d1a75832a2f;k1:13;th:8,a=1,b=2",
        ),
        # the specification's example: ot=p:8;k1:7;r:62 -> ot=p:8;r:62;k1:13 (here for th)
        ("ot=p:8;th:7;r:62", 0, "ot=p:8;r:62;th:0"),
        ("ot=th:8,ot=th:c", 0, "ot=th:0"),  # a duplicate ot member goes
        # None erases th; an ot entry left empty goes
        ("ot=th:8,vendor=abc", None, "vendor=abc"),
        ("ot=rv:6e6d1a75832a2f;th:8", None, "ot=rv:6e6d1a75832a2f"),
    ],
)
def test_with_threshold(tracestate: str, threshold: int | None, expected: str) -> None:
    assert with_threshold(tracestate, threshold) == expected


def test_with_threshold_keeps_the_32_member_limit() -> None:
    others = [f"v{i}=x" for i in range(32)]
    result = with_threshold(",".join(others), 0).split(",")
    assert len(result) == 32
    assert result[0] == "ot=th:0"
    assert result[1:] == others[:31]


def test_an_overlong_ot_value_keeps_only_rv_and_th() -> None:
    tracestate = "ot=rv:6e6d1a75832a2f;junk:" + "x" * 250
    assert with_threshold(tracestate, 1 << 55) == "ot=rv:6e6d1a75832a2f;th:8"


member_keys = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True).filter(lambda k: k != "ot")
member_values = st.from_regex(r"[a-zA-Z0-9]{1,8}", fullmatch=True)


@given(
    st.lists(st.tuples(member_keys, member_values), max_size=5, unique_by=lambda kv: kv[0]),
    st.one_of(st.none(), st.integers(min_value=0, max_value=MAX_ADJUSTED_COUNT - 1)),
    st.one_of(st.none(), thresholds),
    st.one_of(st.none(), thresholds),
)
def test_with_threshold_then_parse_gives_it_back(
    members: list[tuple[str, str]],
    randomness: int | None,
    old: int | None,
    new: int | None,
) -> None:
    subs = []
    if randomness is not None:
        subs.append(f"rv:{randomness:014x}")
    if old is not None:
        subs.append(f"th:{threshold_to_th(old)}")
    others = [f"{key}={value}" for key, value in members]
    tracestate = ",".join(([f"ot={';'.join(subs)}"] if subs else []) + others)
    updated = with_threshold(tracestate, new)
    assert parse_tracestate(updated) == OtelTraceState(threshold=new, randomness=randomness)
    assert [m for m in updated.split(",") if m and not m.startswith("ot=")] == others
    assert with_threshold(updated, new) == updated  # idempotent
