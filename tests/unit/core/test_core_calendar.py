"""Hours and days from final windows: exact merges, one fold per window, restart-safe state."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from processor.core.aggregate import WindowAggregate
from processor.core.calendar import (
    DAY_MS,
    HOUR_MS,
    Calendar,
    HourRollup,
    SeriesDay,
    last_window_end,
)
from processor.core.rollup import FinalRollup, SeriesKey
from processor.core.sketch import LatencySketch

SIZE = 60_000
# Four windows before a UTC hour boundary (and a day boundary: midnight is one too).
T0 = 20 * DAY_MS - 4 * SIZE
A = SeriesKey("a")
B = SeriesKey("b", ("gpt-4o",))


def window(
    series: SeriesKey, index: int, durations_ms: list[int], *, errors: int = 0, cost: int = 7
) -> FinalRollup:
    aggregate = WindowAggregate()
    for n, duration in enumerate(durations_ms):
        aggregate.add(
            trace_id=bytes([index % 256, n % 256]) * 8,
            duration_ns=duration * 1_000_000,
            is_error=n < errors,
            is_invocation=True,
            is_llm=True,
            tokens_prompt=10,
            tokens_completion=5,
            tokens_total=15,
            cost_nanos=cost,
        )
    start = T0 + index * SIZE
    return FinalRollup(series, start, SIZE, aggregate, (0,), complete=True)


def p95_of(durations_ms: list[int]) -> float:
    sketch = LatencySketch()
    for duration in durations_ms:
        sketch.add(float(duration))
    value = sketch.quantile(0.95)
    assert value is not None
    return value


def test_each_window_gets_the_day_so_far_and_the_hour_its_own_totals_once_it_is_over() -> None:
    calendar = Calendar()
    durations = [[100, 200], [300], [50, 60, 70], [4000], [10, 20]]
    points = [calendar.add(window(A, i, d, errors=i % 2)) for i, d in enumerate(durations)]
    assert all(point is not None for point in points)
    seen: list[int] = []
    for i, point in enumerate(points):
        assert point is not None
        day = durations[: i + 1] if i < 4 else durations[4:]  # the fifth opens a new day
        seen = [d for ds in day for d in ds]
        assert point["day/spans"] == len(seen)
        assert point["day/invocations"] == len(seen)
        assert point["day/cost_usd"] == 7 * len(seen) / 1e9
        assert point["day/latency_p95_ms"] == p95_of(seen)
        assert point["day/latency_max_ms"] == max(seen)
        assert point["day/incomplete_windows"] == 0
    assert points[3] is not None and points[3]["day/errors"] == 2  # windows 1 and 3

    # Nobody has closed the hour yet; the fifth window moved the series on, past it.
    [hour] = calendar.close_hours(finalized_until_ms=None)
    assert hour.series == A and hour.hour_start_ms == T0 + 4 * SIZE - HOUR_MS
    assert hour.step == hour.hour_start_ms // HOUR_MS and hour.hour_end_ms == T0 + 4 * SIZE
    assert hour.metrics["hour/spans"] == 7
    assert hour.metrics["hour/latency_p95_ms"] == p95_of([d for ds in durations[:4] for d in ds])
    # Each hour comes out once; the new one only when every partition has closed it.
    assert calendar.close_hours(finalized_until_ms=None) == []
    assert calendar.close_hours(finalized_until_ms=T0 + 5 * SIZE) == []
    [second] = calendar.close_hours(finalized_until_ms=T0 + 4 * SIZE + HOUR_MS)
    assert second.metrics["hour/spans"] == 2


def test_a_replayed_window_is_folded_once() -> None:
    calendar = Calendar()
    first = calendar.add(window(A, 0, [100]))
    assert calendar.add(window(A, 0, [100])) is None
    later = calendar.add(window(A, 1, [100]))
    assert first is not None and later is not None
    assert later["day/spans"] == 2
    assert calendar.replayed_windows == 1


def test_a_window_out_of_order_gets_no_point_and_joins_the_day_from_the_next_point_on() -> None:
    calendar = Calendar()
    calendar.add(window(A, 0, [100]))
    calendar.add(window(A, 2, [100]))
    assert calendar.add(window(A, 1, [100])) is None  # a day point at step 1 now would be 3
    point = calendar.add(window(A, 3, [100]))
    assert point is not None and point["day/spans"] == 4


def test_a_window_after_its_hour_was_written_joins_the_day_not_the_hour() -> None:
    calendar = Calendar()
    calendar.add(window(A, 0, [100]))
    [hour] = calendar.close_hours(finalized_until_ms=T0 + 4 * SIZE)
    assert hour.metrics["hour/spans"] == 1
    point = calendar.add(window(A, 1, [100, 100]))  # finalised incomplete, very late
    assert point is not None and point["day/spans"] == 3
    assert calendar.close_hours(finalized_until_ms=T0 + 4 * SIZE) == []


def test_series_and_window_sizes_keep_their_own_days() -> None:
    calendar = Calendar()
    calendar.add(window(A, 0, [100]))
    other = calendar.add(window(B, 0, [100, 200]))
    assert other is not None and other["day/spans"] == 2
    ten_seconds = window(A, 0, [100])
    ten_seconds.window_size_ms = 10_000
    point = calendar.add(ten_seconds)
    assert point is not None and point["day/spans"] == 1


def test_an_incomplete_window_is_counted_in_its_hour_and_day() -> None:
    calendar = Calendar()
    late = window(A, 0, [100])
    late.complete = False
    point = calendar.add(late)
    assert point is not None and point["day/incomplete_windows"] == 1
    [hour] = calendar.close_hours(finalized_until_ms=T0 + 4 * SIZE)
    assert hour.metrics["hour/incomplete_windows"] == 1


def test_a_day_is_forgotten_once_it_is_over_and_its_hours_are_out() -> None:
    calendar = Calendar()
    calendar.add(window(A, 0, [100]))
    day_end = T0 + 4 * SIZE
    calendar.close_days(finalized_until_ms=day_end)
    assert calendar.open_days == 1  # its last hour is not out yet
    calendar.close_hours(finalized_until_ms=day_end)
    changed, _ = calendar.take_changes()
    assert [day.series for day in changed] == [A]
    calendar.close_days(finalized_until_ms=day_end)
    assert calendar.open_days == 0
    assert calendar.take_changes() == ([], [("a", (), T0 - (T0 % DAY_MS), SIZE)])


def test_the_last_window_of_an_hour_may_reach_past_it() -> None:
    assert last_window_end(0, HOUR_MS, 60_000) == HOUR_MS
    assert last_window_end(0, HOUR_MS, 7 * 60_000) == 63 * 60_000  # starts at 56 min


def test_a_day_survives_a_round_trip_through_its_record() -> None:
    calendar = Calendar()
    for i in (0, 1, 2, 3, 5):  # the fifth is the next day's
        calendar.add(window(B, i, [100 * (i + 1)], errors=1))
    changed, _ = calendar.take_changes()
    day, _ = changed
    again = SeriesDay.from_bytes(day.to_bytes())
    assert again.to_bytes() == day.to_bytes()
    assert again.windows == day.windows and again.series == B
    assert again.day.metrics("day/") == day.day.metrics("day/")


Event = tuple[SeriesKey, int]


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(st.tuples(st.sampled_from([A, B]), st.integers(0, 9)), min_size=1, max_size=30),
    saves=st.sets(st.integers(0, 30)),
    crash=st.integers(0, 30),
    closed_every=st.integers(1, 5),
)
def test_a_restart_from_the_saved_days_writes_what_an_uninterrupted_run_writes(
    events: list[Event], saves: set[int], crash: int, closed_every: int
) -> None:
    """Finalize saves its days at some commits; after a crash it restores the last save and
    replays the windows after that commit (a window may come again, as in any replay)."""

    def final_of(event: Event) -> FinalRollup:
        series, index = event
        return window(series, index, [10 * (index + 1), 7 * len(series.agent)])

    def run(
        calendar: Calendar, todo: list[Event], start: int
    ) -> tuple[dict[tuple[SeriesKey, int], dict[str, float]], dict[tuple[SeriesKey, int], dict]]:
        points: dict[tuple[SeriesKey, int], dict[str, float]] = {}
        hours: dict[tuple[SeriesKey, int], dict] = {}
        for n, event in enumerate(todo, start):
            final = final_of(event)
            point = calendar.add(final)
            if point is not None:
                points[(final.series, final.step)] = point
            if n % closed_every == 0:
                # As far as every partition has closed: the windows before this one.
                hour: HourRollup
                for hour in calendar.close_hours(final.window_start_ms):
                    hours[(hour.series, hour.step)] = hour.metrics
        return points, hours

    # Windows come in the order finalize writes them: by start, one per series and step.
    ordered = sorted(set(events), key=lambda event: (event[1], event[0]))
    clean_points, clean_hours = run(Calendar(), ordered, 0)

    crash_at = min(crash, len(ordered))
    first = Calendar()
    saved: list[SeriesDay] = []
    saved_at = 0
    points: dict = {}
    hours: dict = {}
    for n in range(crash_at):
        got_points, got_hours = run(first, [ordered[n]], n)
        points.update(got_points)
        hours.update(got_hours)
        if n in saves:
            changed, _ = first.take_changes()
            by_key = {day.key: day for day in saved}
            by_key.update({day.key: SeriesDay.from_bytes(day.to_bytes()) for day in changed})
            saved = list(by_key.values())
            saved_at = n + 1
    restarted = Calendar()
    restarted.restore(saved)
    # Replayed from the commit of the last save: some windows come a second time.
    got_points, got_hours = run(restarted, ordered[saved_at:], saved_at)
    for key, values in got_points.items():
        assert points.get(key, values) == values, "a second, different value at one step"
    points.update(got_points)
    for key, values in got_hours.items():
        assert hours.get(key, values) == values, "an hour written twice with other values"
    hours.update(got_hours)
    assert points == clean_points
    assert hours == clean_hours
