"""The operator's imports stay small: every module of `llmops` imports in an interpreter where
torch, deepspeed, numpy and the workload package cannot be imported (as in the operator image),
and the kopf controllers do not even load numpy (Optuna, which needs it, is imported only when
a TPE sweep suggests a trial). `lint-imports` checks the layers statically; this checks what
really happens at import time, lazy imports and third-party packages included."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.unit

BLOCKED = ("torch", "deepspeed", "numpy", "llmops_trainer")

# Installs a meta-path finder that refuses the blocked packages, then imports every module of
# llmops (except __main__, which runs the command line) and prints what it imported.
WITHOUT_WORKLOAD = textwrap.dedent(
    """
    import importlib, importlib.abc, json, pkgutil, sys

    BLOCKED = set(sys.argv[1].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ImportError(f"{name} is not installed in the operator image")
            return None

    def fail(name):
        raise ImportError(f"cannot import {name}")

    sys.meta_path.insert(0, Block())
    import llmops

    names = sorted(
        info.name
        for info in pkgutil.walk_packages(llmops.__path__, "llmops.", onerror=fail)
        if info.name != "llmops.__main__"
    )
    for name in names:
        importlib.import_module(name)
    print(json.dumps(names))
    """
)

# A plain interpreter: which heavy packages does importing the controllers and the CLI load?
LOADED_BY = textwrap.dedent(
    """
    import json, sys
    import llmops.controllers, llmops.cli
    print(json.dumps(sorted(m for m in sys.argv[1].split(",") if m in sys.modules)))
    """
)


def _python(script: str, argument: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, argument], capture_output=True, text=True, timeout=300
    )


def test_every_operator_module_imports_without_torch_numpy_or_the_workload() -> None:
    result = _python(WITHOUT_WORKLOAD, ",".join(BLOCKED))
    assert result.returncode == 0, result.stderr
    imported = set(json.loads(result.stdout))
    # The walk really covered the layers (a broken walk would pass vacuously).
    for module in (
        "llmops.cli",
        "llmops.crdgen",
        "llmops.search",
        "llmops.api.workload",
        "llmops.builders.trainingrun",
        "llmops.decide.trainingrun",
        "llmops.controllers.trainingrun",
        "llmops.controllers.sweep",
        "llmops.local.runner",
    ):
        assert module in imported


def test_controllers_and_cli_load_neither_numpy_nor_the_workload() -> None:
    result = _python(LOADED_BY, ",".join(("numpy", "optuna", *BLOCKED)))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
