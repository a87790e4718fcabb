"""The OpenTelemetry entry (``ot``) of a W3C ``tracestate``: read ``th`` and ``rv``, set ``th``.

A W3C tracestate is a comma-separated list of ``key=value`` members (at most 32); OpenTelemetry
keeps all its values in the one ``ot`` member, a semicolon-separated list of ``key:value``
sub-keys (``ot=rv:6e6d1a75832a2f;th:c``). Reading is lenient: an invalid ``th`` or ``rv`` reads
as absent. Writing follows the specifications: the updated ``ot`` member moves to the front of
the list (W3C), its ``th`` is replaced or appended while every other sub-key, ``rv`` included,
is kept (OpenTelemetry), and every other member is kept in order.
"""

from __future__ import annotations

from dataclasses import dataclass

from processor.core.sampling.threshold import rv_to_randomness, th_to_threshold, threshold_to_th

OT_KEY = "ot"
MAX_MEMBERS = 32  # W3C: a tracestate holds at most 32 list members
MAX_OT_VALUE_CHARS = 256  # OpenTelemetry: the whole ot value


@dataclass(frozen=True, slots=True)
class OtelTraceState:
    """The sampling sub-keys of a tracestate's ``ot`` entry; None where absent or invalid."""

    threshold: int | None = None
    randomness: int | None = None


_EMPTY = OtelTraceState()


def _members(tracestate: str) -> list[str]:
    return [member for raw in tracestate.split(",") if (member := raw.strip(" \t"))]


def _ot_value(member: str) -> str | None:
    key, sep, value = member.partition("=")
    return value if sep and key == OT_KEY else None


def parse_tracestate(tracestate: str) -> OtelTraceState:
    """The ``th`` threshold and ``rv`` randomness of the first ``ot`` member, if any."""
    if "ot=" not in tracestate:
        return _EMPTY  # the common case: no OpenTelemetry entry at all
    for member in _members(tracestate):
        value = _ot_value(member)
        if value is None:
            continue
        threshold: int | None = None
        randomness: int | None = None
        seen: set[str] = set()
        for sub in value.split(";"):
            key, sep, sub_value = sub.partition(":")
            if not sep or key in seen:
                continue  # keys must be unique: the first one counts
            seen.add(key)
            if key == "th":
                threshold = th_to_threshold(sub_value)
            elif key == "rv":
                randomness = rv_to_randomness(sub_value)
        return OtelTraceState(threshold, randomness)
    return _EMPTY


def with_threshold(tracestate: str, threshold: int | None) -> str:
    """``tracestate`` with its ``ot`` entry's ``th`` set to ``threshold`` (removed for None).

    The ``ot`` member moves to the front; a member past the 32-member limit is dropped from the
    end. Were the ``ot`` value to pass 256 characters, only its ``rv`` and ``th`` sub-keys stay:
    a stale ``th`` would misstate the adjusted count, foreign sub-keys are only lost.
    """
    members = _members(tracestate)
    others: list[str] = []
    ot_subs: list[str] | None = None
    for member in members:
        value = _ot_value(member)
        if value is None:
            others.append(member)
        elif ot_subs is None:  # a second ot member is invalid: it goes
            ot_subs = [sub for sub in value.split(";") if sub and not sub.startswith("th:")]
    subs = ot_subs or []
    if threshold is not None:
        subs.append("th:" + threshold_to_th(threshold))
    ot_value = ";".join(subs)
    if len(ot_value) > MAX_OT_VALUE_CHARS:
        ot_value = ";".join(sub for sub in subs if sub.startswith(("rv:", "th:")))
    if not ot_value:
        return ",".join(others[:MAX_MEMBERS])
    return ",".join([f"{OT_KEY}={ot_value}", *others[: MAX_MEMBERS - 1]])
