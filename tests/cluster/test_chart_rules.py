"""The chart's alerting rules, checked and unit-tested by promtool (built from the pinned
Prometheus module, tests/cluster/components/promtool)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from build_components import component_bin_dirs

pytestmark = pytest.mark.cluster

RULES = Path(__file__).resolve().parents[2] / "helm" / "llmops" / "rules"


def promtool(*args: str) -> str:
    binary = component_bin_dirs().get("promtool")
    assert binary is not None, "promtool is not built: run python tests/cluster/build_components.py"
    result = subprocess.run(
        [str(binary), *args], cwd=RULES, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_promtool_check_rules():
    out = promtool("check", "rules", "llmops.rules.yaml")
    assert "SUCCESS: 12 rules found" in out


def test_promtool_unit_tests_fire_each_alert_when_it_should():
    out = promtool("test", "rules", "llmops.rules.test.yaml")
    assert "SUCCESS" in out
