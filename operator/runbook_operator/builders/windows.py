"""The clock of a ScalingProfile: which bounds apply at a given instant and when they next change.

Pure functions of the spec and an explicit ``now`` (an aware datetime), so every edge, DST change included,
is testable without waiting. Cron starts are evaluated in the window's time zone (croniter with a
zoneinfo-aware datetime: a start inside a spring-forward gap fires at the first valid instant after it, a
start in a fall-back hour fires for each of its two occurrences); durations are elapsed time, so the
arithmetic is done in UTC (adding to a zone-aware datetime in Python adds wall-clock time).
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from croniter import croniter

from ..models.common import parse_duration
from ..models.scaling import ScalingProfileSpec, ScalingWindow

# A window whose occurrences overlap stays open across them; this bounds the walk over the overlaps.
_MAX_CHAINED_OCCURRENCES = 1_000
_JUST_AFTER = timedelta(microseconds=1)


@dataclass(frozen=True)
class Bounds:
    """The replica bounds in force at an instant."""

    min_replicas: int
    max_replicas: int
    window: str | None  # the window in force, if any
    override_until: datetime | None  # set while an override pins the bounds
    next_transition: datetime | None  # the next instant at which any window or the override changes


def _occurrences(window: ScalingWindow, after: datetime) -> croniter:
    """An iterator over the window's start times, positioned at ``after`` in the window's time zone."""
    return croniter(window.start, after.astimezone(zoneinfo.ZoneInfo(window.time_zone)))


def _next_start(starts: croniter) -> datetime:
    start: datetime = starts.get_next(datetime)
    return start.astimezone(UTC)


def window_end(window: ScalingWindow, now: datetime) -> datetime | None:
    """When the window open at ``now`` closes (occurrences that overlap chain), or None if it is closed."""
    duration = parse_duration(window.duration)
    latest: datetime = _occurrences(window, now + _JUST_AFTER).get_prev(datetime)
    end = latest.astimezone(UTC) + duration
    if end <= now:
        return None
    starts = _occurrences(window, now)
    for _ in range(_MAX_CHAINED_OCCURRENCES):
        start = _next_start(starts)
        if start >= end:
            return end
        end = max(end, start + duration)
    return end


def next_edge(window: ScalingWindow, now: datetime) -> datetime:
    """The next instant after ``now`` at which the window opens or closes."""
    end = window_end(window, now)
    return end if end is not None else _next_start(_occurrences(window, now))


def effective_bounds(spec: ScalingProfileSpec, now: datetime) -> Bounds | None:
    """The bounds at ``now``: an unexpired override, else the first open window, else the autoscaling bounds.

    None when the profile has no autoscaling (it then manages container resources only).
    """
    if spec.autoscaling is None:
        return None
    edges = [next_edge(window, now) for window in spec.windows]
    override = spec.override
    if override is not None and _aware(override.until) > now:
        until = _aware(override.until)
        return Bounds(override.replicas, override.replicas, None, until, min([until, *edges]))
    open_window = next((w for w in spec.windows if window_end(w, now) is not None), None)
    next_transition = min(edges, default=None)
    if open_window is not None:
        return Bounds(open_window.min_replicas, open_window.max_replicas, open_window.name, None, next_transition)
    return Bounds(spec.autoscaling.min_replicas, spec.autoscaling.max_replicas, None, None, next_transition)


def _aware(moment: datetime) -> datetime:
    """A datetime without a zone is taken as UTC (RFC 3339 in the API always has one)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
