from __future__ import annotations

import pytest

from llmops.conditions import get_condition, is_true, set_condition

T0 = "2026-01-01T00:00:00Z"
T1 = "2026-01-01T00:05:00Z"


def test_new_condition_is_appended_with_all_fields():
    conditions = set_condition(
        [], "Running", "True", "PodsRunning", "4/4 pods", generation=3, now=T0
    )
    assert conditions == [
        {
            "type": "Running",
            "status": "True",
            "reason": "PodsRunning",
            "message": "4/4 pods",
            "lastTransitionTime": T0,
            "observedGeneration": 3,
        }
    ]


def test_transition_time_changes_only_when_status_changes():
    first = set_condition([], "Ready", "False", "Starting", now=T0)
    same_status = set_condition(first, "Ready", "False", "StillStarting", "loading", now=T1)
    assert get_condition(same_status, "Ready") == {
        "type": "Ready",
        "status": "False",
        "reason": "StillStarting",
        "message": "loading",
        "lastTransitionTime": T0,
    }
    flipped = set_condition(same_status, "Ready", "True", "Loaded", now=T1)
    assert get_condition(flipped, "Ready")["lastTransitionTime"] == T1
    assert is_true(flipped, "Ready")
    assert not is_true(flipped, "Complete")


def test_other_conditions_keep_their_order_and_input_is_not_mutated():
    original = set_condition([], "Created", "True", "Created", now=T0)
    original = set_condition(original, "Running", "False", "Pending", now=T0)
    snapshot = [dict(c) for c in original]
    updated = set_condition(original, "Created", "True", "Created", generation=2, now=T1)
    assert [c["type"] for c in updated] == ["Created", "Running"]
    assert original == snapshot


@pytest.mark.parametrize("reason", ["", "has space", "9Lives", "dash-ed"])
def test_reason_must_be_camel_case(reason: str):
    with pytest.raises(ValueError, match="CamelCase"):
        set_condition([], "Ready", "True", reason)
