"""status.conditions with metav1.Condition semantics, as plain dicts (pure functions).

lastTransitionTime changes only when a condition's status changes; reason, message and
observedGeneration follow every update. The controllers and the local runtime both use these,
so a resource reads the same wherever it ran.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any, Literal

ConditionStatus = Literal["True", "False", "Unknown"]
Condition = dict[str, Any]


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: Sequence[Condition] | None,
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str = "",
    *,
    generation: int | None = None,
    now: str | None = None,
) -> list[Condition]:
    """A new list with condition `type_` set; the others are kept in order."""
    if not reason or not reason[0].isalpha() or not reason.replace("_", "").isalnum():
        # metav1.Condition requires a CamelCase identifier as the reason.
        raise ValueError(f"condition reason must be CamelCase, got {reason!r}")
    timestamp = now or now_rfc3339()
    result: list[Condition] = []
    found = False
    for existing in conditions or []:
        if existing.get("type") != type_:
            result.append(dict(existing))
            continue
        found = True
        changed = existing.get("status") != status
        result.append(
            _condition(
                type_,
                status,
                reason,
                message,
                generation,
                timestamp if changed else existing.get("lastTransitionTime", timestamp),
            )
        )
    if not found:
        result.append(_condition(type_, status, reason, message, generation, timestamp))
    return result


def _condition(
    type_: str, status: str, reason: str, message: str, generation: int | None, when: str
) -> Condition:
    condition: Condition = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": when,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def get_condition(conditions: Sequence[Condition] | None, type_: str) -> Condition | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_true(conditions: Sequence[Condition] | None, type_: str) -> bool:
    condition = get_condition(conditions, type_)
    return condition is not None and condition.get("status") == "True"
