from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from llmops import __version__
from llmops.cli import main


def test_python_dash_m_prints_the_version():
    out = subprocess.run(
        [sys.executable, "-m", "llmops", "version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == __version__


def test_run_rejects_a_missing_manifest_with_exit_code_2(tmp_path: Path, capsys):
    assert main(["run", "-f", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such file or folder" in capsys.readouterr().err
