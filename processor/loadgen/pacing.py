"""Real-time traffic: traces at a steady rate, each ending at the wall-clock moment it is made.

The clocks and the sleep are injected, so tests can drive time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from processor.loadgen.traces import GeneratedTrace, TraceGenerator


async def realtime_traces(
    generator: TraceGenerator,
    *,
    rate: float,
    count: int | None,
    duration_s: float | None,
    wall_clock_ns: Callable[[], int],
    monotonic_s: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]],
) -> AsyncIterator[GeneratedTrace]:
    """Yield trace 0, 1, ... at ``rate`` traces/s until ``count`` traces or ``duration_s``
    seconds (whichever comes first; neither means until cancelled).

    Trace ``i`` is due ``i / rate`` seconds after the start; a consumer that falls behind gets
    the overdue traces at once rather than a slower rate, so the average holds.
    """
    if not rate > 0:
        raise ValueError(f"rate must be > 0 traces/s, got {rate}")
    started = monotonic_s()
    index = 0
    while count is None or index < count:
        due = index / rate
        if duration_s is not None and due >= duration_s:
            return
        wait = started + due - monotonic_s()
        if wait > 0:
            await sleep(wait)
        yield generator.trace(index, end_ns=wall_clock_ns())
        index += 1
