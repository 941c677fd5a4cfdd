"""Run import-linter over the whole `spotserve` namespace.

import-linter (grimp) finds a package's modules by walking its folder, but spotserve's
subpackages live in other folders (package-dir mapping: controlplane/ → spotserve.operator,
worker/ → spotserve.worker, proto/spotserve/v1 → spotserve.v1). This assembles the
Python files into one temporary `spotserve/` tree and runs `lint-imports` on it with the
contracts from pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def assemble(dest: Path) -> None:
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    # parents before children, so a child folder lands inside its parent's copy
    for package, folder in sorted(dirs.items(), key=lambda kv: kv[0].count(".")):
        target = dest.joinpath(*package.split("."))
        for src in [*(ROOT / folder).rglob("*.py"), *(ROOT / folder).rglob("*.pyi")]:
            rel = src.relative_to(ROOT / folder)
            if rel.parts and (ROOT / folder / rel.parts[0]).resolve() in _mapped_folders(dirs):
                continue  # a folder mapped to its own package
            out = target / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out)


def _mapped_folders(dirs: dict[str, str]) -> set[Path]:
    return {(ROOT / folder).resolve() for folder in dirs.values()}


def main() -> int:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    with tempfile.TemporaryDirectory() as tmp:
        assemble(Path(tmp))
        env = {**os.environ, "PYTHONPATH": tmp + os.pathsep + os.environ.get("PYTHONPATH", "")}
        return subprocess.call([lint, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                               cwd=tmp, env=env)


if __name__ == "__main__":
    sys.exit(main())
