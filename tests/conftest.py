"""Shared test configuration: every test gets the marker of the tier folder it lives in."""

from __future__ import annotations

from pathlib import Path

import pytest

TIERS = ("unit", "cluster", "trainer", "e2e")
ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        relative = Path(item.fspath).resolve().relative_to(ROOT / "tests")
        tier = relative.parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
