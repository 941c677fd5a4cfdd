"""ruff, mypy (strict on the core) and import-linter, as part of the test suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e .[dev])")
    return path


def test_ruff() -> None:
    out = _run(_tool("ruff"), "check", ".")
    assert out.returncode == 0, out.stdout[-5000:]


def test_mypy_strict_everywhere() -> None:
    _tool("mypy")
    out = _run(sys.executable, str(ROOT / "scripts" / "typecheck.py"))
    assert out.returncode == 0, out.stdout[-5000:]


def test_import_layers() -> None:
    _tool("lint-imports")
    out = _run(sys.executable, str(ROOT / "scripts" / "lint_imports.py"))
    assert out.returncode == 0, out.stdout[-5000:]
