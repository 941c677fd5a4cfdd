"""scripts/install-helm.sh without the network: idempotent when helm is there, a clear
message when it cannot install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .crd_schema import ROOT

SCRIPT = ROOT / "scripts" / "install-helm.sh"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_does_nothing_when_helm_is_installed(tmp_path: Path) -> None:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    helm = shutil.which("helm", path=path)
    if helm is None:
        pytest.skip("helm is not installed; run: bash scripts/install-helm.sh .venv/bin")
    shutil.copy(helm, tmp_path / "helm")
    out = _run(str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "already in" in out.stdout


def test_fails_with_a_clear_message(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    out = _run(str(not_a_dir))
    assert out.returncode != 0
    assert out.stderr.startswith("install-helm: ")
