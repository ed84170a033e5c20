"""Conditions keep their lastTransitionTime unless the status changes."""

from __future__ import annotations

from runbook_operator.conditions import get_condition, is_true, set_condition


def test_transition_time_moves_only_on_status_change() -> None:
    first = set_condition(None, type="Ready", status="False", reason="Pending", now="2026-01-01T00:00:00Z")
    same = set_condition(first, type="Ready", status="False", reason="StillPending", now="2026-01-02T00:00:00Z")
    assert get_condition(same, "Ready") == {
        "type": "Ready",
        "status": "False",
        "reason": "StillPending",
        "message": "",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    flipped = set_condition(same, type="Ready", status="True", reason="Ok", generation=3, now="2026-01-03T00:00:00Z")
    ready = get_condition(flipped, "Ready")
    assert ready is not None
    assert ready["lastTransitionTime"] == "2026-01-03T00:00:00Z" and ready["observedGeneration"] == 3
    assert is_true(flipped, "Ready") and not is_true(flipped, "Missing")


def test_other_conditions_are_kept_in_order() -> None:
    conditions = set_condition(None, type="Ready", status="True", reason="Ok")
    conditions = set_condition(conditions, type="Paused", status="False", reason="NotIsolated")
    conditions = set_condition(conditions, type="Ready", status="False", reason="Broken", message="x" * 5000)
    assert [c["type"] for c in conditions] == ["Ready", "Paused"]
    assert len(conditions[0]["message"]) == 1024
