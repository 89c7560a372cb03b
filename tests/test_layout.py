"""The package layout: imports point down only (pyproject.toml's import-linter layers contract),
and the contract is not a formality: an import upwards, lazy or not, breaks it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports with the project's contract, over the `re2tal` package found in `root`."""
    return subprocess.run([str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=root, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(root), "PATH": str(LINT.parent)})


def test_imports_point_down_the_layers():
    out = lint(ROOT)
    assert out.returncode == 0 and "re2tal layers KEPT" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]


def test_an_import_upwards_breaks_the_contract(tmp_path):
    """A lazy import of a task from the shared training loop: the circle the layout forbids."""
    shutil.copytree(ROOT / "re2tal", tmp_path / "re2tal", ignore=shutil.ignore_patterns("__pycache__"))
    loop = tmp_path / "re2tal" / "training" / "loop.py"
    loop.write_text(loop.read_text() + "\n\ndef _upwards():\n    from re2tal.tasks.localization import Localization\n")
    out = lint(tmp_path)
    assert out.returncode != 0 and "re2tal layers BROKEN" in out.stdout, out.stdout[-3000:]
    assert "re2tal.training.loop -> re2tal.tasks.localization" in out.stdout, out.stdout[-3000:]
