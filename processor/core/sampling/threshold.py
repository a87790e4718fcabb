"""OpenTelemetry consistent probability sampling: thresholds, randomness and ``th`` values.

Follows the OpenTelemetry specification "TraceState: Probability Sampling". A *rejection
threshold* is an integer in ``[0, 2**56]``; an item whose 56-bit *randomness* is at or above the
threshold is kept. ``0`` keeps everything (``th:0``); ``2**56`` keeps nothing and has no ``th``
encoding (OpenTelemetry defines no probability 0). Randomness comes from the explicit ``rv``
value of the ``ot`` tracestate entry when there is one, else from the trace id's last 7 bytes.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

MAX_ADJUSTED_COUNT = 1 << 56
ALWAYS_SAMPLE_THRESHOLD = 0
NEVER_SAMPLE_THRESHOLD = MAX_ADJUSTED_COUNT
HEX_DIGITS = 14  # 56 bits

_TH_VALUE = re.compile(r"[0-9a-fA-F]{1,14}")
_RV_VALUE = re.compile(r"[0-9a-f]{14}")


def probability_to_threshold(probability: float, precision: int | None = None) -> int:
    """The rejection threshold for keeping ``probability`` of all items.

    Exact: ``2**56 - round(probability * 2**56)`` (halves round up, as in the reference Go
    implementation). With ``precision`` (1..14 hex digits) the threshold is rounded to that many
    significant digits, plus one digit for every leading ``f`` that a small probability implies,
    as in the specification's table (``0.1`` at precision 4 is ``e666``). A probability below
    ``2**-57`` rounds to the never-sample threshold ``2**56``.
    """
    if not (math.isfinite(probability) and 0.0 <= probability <= 1.0):
        raise ValueError(f"probability must be a number from 0 to 1, got {probability!r}")
    if precision is not None and not 1 <= precision <= HEX_DIGITS:
        raise ValueError(f"precision must be 1 to {HEX_DIGITS} hex digits, got {precision!r}")
    scaled = math.floor(Fraction(probability) * MAX_ADJUSTED_COUNT + Fraction(1, 2))
    exact = MAX_ADJUSTED_COUNT - scaled
    if precision is None or exact in (ALWAYS_SAMPLE_THRESHOLD, NEVER_SAMPLE_THRESHOLD):
        return exact
    _, exponent = math.frexp(probability)
    digits = min(HEX_DIGITS, precision + exponent // -4)
    shift = 4 * (HEX_DIGITS - digits)
    if shift == 0:
        return exact
    # Half up. This never carries into 2**56: the digits added for the leading 'f's of a small
    # probability always leave a kept digit below 'f' (property-tested).
    return ((exact + (1 << (shift - 1))) >> shift) << shift


def threshold_to_th(threshold: int) -> str:
    """The ``th`` sub-key value: 14 lowercase hex digits, trailing zeros removed; ``0`` alone
    for always-sample."""
    if not 0 <= threshold < MAX_ADJUSTED_COUNT:
        raise ValueError(f"a th value encodes a threshold in [0, 2**56), got {threshold!r}")
    if threshold == ALWAYS_SAMPLE_THRESHOLD:
        return "0"
    return f"{threshold:014x}".rstrip("0")


def th_to_threshold(value: str) -> int | None:
    """The threshold a ``th`` value encodes (1 to 14 hex digits, implicitly padded with
    trailing zeros); None when the value is not valid."""
    if not _TH_VALUE.fullmatch(value):
        return None
    return int(value, 16) << (4 * (HEX_DIGITS - len(value)))


def rv_to_randomness(value: str) -> int | None:
    """The randomness an ``rv`` value holds (exactly 14 lowercase hex digits); None when the
    value is not valid."""
    if not _RV_VALUE.fullmatch(value):
        return None
    return int(value, 16)


def trace_id_randomness(trace_id: bytes) -> int:
    """The randomness W3C Trace Context Level 2 puts in a trace id: its last 7 bytes."""
    return int.from_bytes(trace_id[-7:], "big")


def threshold_probability(threshold: int) -> float:
    """The probability of keeping an item at ``threshold``."""
    return (MAX_ADJUSTED_COUNT - threshold) / MAX_ADJUSTED_COUNT


def adjusted_count(threshold: int) -> float:
    """How many items of the population one item kept at ``threshold`` stands for."""
    if not 0 <= threshold < MAX_ADJUSTED_COUNT:
        raise ValueError(f"no item is kept at threshold {threshold!r}")
    return MAX_ADJUSTED_COUNT / (MAX_ADJUSTED_COUNT - threshold)


def extra_weight(threshold: int, unit: int) -> int:
    """The adjusted count at ``threshold`` minus one, in ``1/unit`` parts, rounded half up:
    what one kept item adds on top of itself when counts are scaled. Exact integer arithmetic,
    so every worker computes the same value."""
    if not 0 <= threshold < MAX_ADJUSTED_COUNT:
        raise ValueError(f"no item is kept at threshold {threshold!r}")
    kept = MAX_ADJUSTED_COUNT - threshold
    return (2 * MAX_ADJUSTED_COUNT * unit + kept) // (2 * kept) - unit
