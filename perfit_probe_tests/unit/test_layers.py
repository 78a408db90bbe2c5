"""The import layers of ``pyproject.toml`` (``[tool.importlinter]``): kept, and able to fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root`` (imported from there, not from site-packages)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_layer_contract_is_kept():
    done = _lint(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(REPO / "perfit_probe", tmp_path / "perfit_probe",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shift = tmp_path / "perfit_probe" / "analysis" / "shift.py"
    shift.write_text(shift.read_text() + "\nfrom perfit_probe.plotting import save_figures  # noqa: E402\n")
    done = _lint(tmp_path)
    assert done.returncode != 0
    assert "perfit_probe.analysis.shift -> perfit_probe.plotting" in done.stdout
