"""The ScalingProfile clock with an injected ``now``: bounds before, during and after windows, across DST
changes in a non-UTC zone, and overrides that expire on time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from runbook_operator.builders.windows import effective_bounds, next_edge, window_end
from runbook_operator.models.scaling import ScalingProfileSpec, ScalingWindow

NEW_YORK = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


def profile(*windows: dict[str, Any], override: dict[str, Any] | None = None) -> ScalingProfileSpec:
    raw: dict[str, Any] = {
        "targetRef": {"name": "api"},
        "autoscaling": {"minReplicas": 2, "maxReplicas": 10},
        "windows": list(windows),
    }
    if override is not None:
        raw["override"] = override
    return ScalingProfileSpec.model_validate(raw)


BUSINESS_HOURS = {
    "name": "business-hours",
    "start": "0 8 * * 1-5",
    "duration": "10h",
    "timeZone": "America/New_York",
    "minReplicas": 4,
    "maxReplicas": 10,
}


def ny(*args: int) -> datetime:
    return datetime(*args, tzinfo=NEW_YORK)


@pytest.mark.parametrize(
    ("now", "bounds", "window", "next_transition"),
    [
        # Tuesday 2026-01-13, EST (UTC-5).
        (ny(2026, 1, 13, 7, 59), (2, 10), None, ny(2026, 1, 13, 8, 0)),
        (ny(2026, 1, 13, 8, 0), (4, 10), "business-hours", ny(2026, 1, 13, 18, 0)),
        (ny(2026, 1, 13, 12, 30), (4, 10), "business-hours", ny(2026, 1, 13, 18, 0)),
        (ny(2026, 1, 13, 18, 0), (2, 10), None, ny(2026, 1, 14, 8, 0)),
        # Friday evening: the next opening is Monday.
        (ny(2026, 1, 16, 18, 30), (2, 10), None, ny(2026, 1, 19, 8, 0)),
    ],
)
def test_bounds_before_during_and_after_a_window(
    now: datetime, bounds: tuple[int, int], window: str | None, next_transition: datetime
) -> None:
    result = effective_bounds(profile(BUSINESS_HOURS), now.astimezone(UTC))
    assert result is not None
    assert (result.min_replicas, result.max_replicas) == bounds
    assert result.window == window
    assert result.next_transition == next_transition.astimezone(UTC)
    assert result.override_until is None


def test_window_follows_local_time_across_spring_forward() -> None:
    """US clocks go forward on Sunday 2026-03-08: 08:00 New York is 13:00 UTC before, 12:00 UTC after."""
    spec = profile(BUSINESS_HOURS)
    friday_evening = datetime(2026, 3, 6, 23, 30, tzinfo=UTC)  # 18:30 EST
    bounds = effective_bounds(spec, friday_evening)
    assert bounds is not None and bounds.window is None
    assert bounds.next_transition == datetime(2026, 3, 9, 12, 0, tzinfo=UTC)  # Monday 08:00 EDT
    # 12:30 UTC is 07:30 on the Friday before (closed) and 08:30 on the Monday after (open).
    before = effective_bounds(spec, datetime(2026, 3, 6, 12, 30, tzinfo=UTC))
    after = effective_bounds(spec, datetime(2026, 3, 9, 12, 30, tzinfo=UTC))
    assert before is not None and before.window is None and before.min_replicas == 2
    assert after is not None and after.window == "business-hours" and after.min_replicas == 4
    assert after.next_transition == datetime(2026, 3, 9, 22, 0, tzinfo=UTC)  # 18:00 EDT


def test_window_follows_local_time_across_fall_back_in_berlin() -> None:
    """Berlin goes back on Sunday 2026-10-25: a 09:00 daily start is 07:00 UTC before and 08:00 UTC after."""
    window = {**BUSINESS_HOURS, "start": "0 9 * * *", "timeZone": "Europe/Berlin", "duration": "2h"}
    spec = profile(window)
    saturday = effective_bounds(spec, datetime(2026, 10, 24, 7, 30, tzinfo=UTC))
    sunday_early = effective_bounds(spec, datetime(2026, 10, 25, 7, 30, tzinfo=UTC))  # 08:30 CET
    sunday_open = effective_bounds(spec, datetime(2026, 10, 25, 8, 30, tzinfo=UTC))  # 09:30 CET
    assert saturday is not None and saturday.window == "business-hours"
    assert sunday_early is not None and sunday_early.window is None
    assert sunday_early.next_transition == datetime(2026, 10, 25, 8, 0, tzinfo=UTC)
    assert sunday_open is not None and sunday_open.window == "business-hours"
    assert sunday_open.next_transition == datetime(2026, 10, 25, 10, 0, tzinfo=UTC)


def test_duration_is_elapsed_time_across_the_dst_instant() -> None:
    """A 6h window from midnight on the spring-forward night closes 6 real hours later, at 07:00 local."""
    window = ScalingWindow.model_validate(
        {**BUSINESS_HOURS, "start": "0 0 * * *", "duration": "6h", "timeZone": "America/New_York"}
    )
    end = window_end(window, ny(2026, 3, 8, 1, 0).astimezone(UTC))
    assert end == ny(2026, 3, 8, 7, 0).astimezone(UTC)
    assert end == datetime(2026, 3, 8, 11, 0, tzinfo=UTC)


def test_start_in_the_skipped_hour_fires_after_the_gap() -> None:
    window = ScalingWindow.model_validate({**BUSINESS_HOURS, "start": "30 2 * * *", "duration": "1h"})
    opening = next_edge(window, ny(2026, 3, 7, 12, 0).astimezone(UTC))
    assert opening == ny(2026, 3, 8, 3, 0).astimezone(UTC)


def test_overlapping_occurrences_keep_the_window_open() -> None:
    window = ScalingWindow.model_validate({**BUSINESS_HOURS, "start": "0 */2 * * *", "duration": "3h"})
    now = datetime(2026, 1, 13, 12, 0, tzinfo=UTC)
    end = window_end(window, now)
    assert end is not None and end - now > timedelta(days=1)  # it never closes; the walk is bounded


def test_first_listed_open_window_wins() -> None:
    night = {**BUSINESS_HOURS, "name": "night", "start": "0 0 * * *", "duration": "1d", "minReplicas": 3}
    bounds = effective_bounds(profile(BUSINESS_HOURS, night), ny(2026, 1, 13, 9, 0).astimezone(UTC))
    assert bounds is not None and (bounds.window, bounds.min_replicas) == ("business-hours", 4)


def test_override_pins_bounds_until_it_expires() -> None:
    until = datetime(2026, 1, 13, 15, 0, tzinfo=UTC)  # 10:00 EST, inside business hours
    spec = profile(BUSINESS_HOURS, override={"replicas": 7, "until": until.isoformat(), "reason": "launch"})
    during = effective_bounds(spec, until - timedelta(seconds=1))
    assert during is not None
    assert (during.min_replicas, during.max_replicas, during.override_until) == (7, 7, until)
    assert during.next_transition == until
    at_expiry = effective_bounds(spec, until)
    assert at_expiry is not None
    assert (at_expiry.min_replicas, at_expiry.window, at_expiry.override_until) == (4, "business-hours", None)


def test_override_wakes_for_an_earlier_window_edge() -> None:
    until = datetime(2026, 1, 14, 0, 0, tzinfo=UTC)
    spec = profile(BUSINESS_HOURS, override={"replicas": 3, "until": until.isoformat(), "reason": "incident"})
    bounds = effective_bounds(spec, ny(2026, 1, 13, 9, 0).astimezone(UTC))
    assert bounds is not None and bounds.next_transition == ny(2026, 1, 13, 18, 0).astimezone(UTC)


def test_no_windows_no_transition_and_no_autoscaling_no_bounds() -> None:
    now = datetime(2026, 1, 13, 12, 0, tzinfo=UTC)
    bounds = effective_bounds(profile(), now)
    assert bounds is not None and (bounds.min_replicas, bounds.max_replicas, bounds.next_transition) == (2, 10, None)
    assert effective_bounds(ScalingProfileSpec.model_validate({"targetRef": {"name": "api"}}), now) is None
