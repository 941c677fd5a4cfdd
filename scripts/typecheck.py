"""Run mypy (strict, per pyproject.toml) over the whole `spotserve` namespace.

Like import-linter, mypy resolves packages by folder, and spotserve's subpackages live in
other folders (operator/, worker/, proto/spotserve/v1). This type-checks the assembled
tree (see lint_imports.py) and maps the reported paths back to the repository's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from lint_imports import ROOT, assemble


def main() -> int:
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent)) or "mypy"
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    # a fixed place, so mypy's incremental cache stays valid between runs
    tree = ROOT / "build" / "typecheck"
    shutil.rmtree(tree, ignore_errors=True)
    assemble(tree)
    tmp = str(tree)
    env = {**os.environ, "MYPYPATH": tmp}
    out = subprocess.run([mypy, "--config-file", str(ROOT / "pyproject.toml"),
                          str(tree / "spotserve")], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    text = out.stdout + out.stderr
    # the assembled tree lies inside the repo, so mypy prints paths relative to it;
    # longest package first, so spotserve/operator maps before spotserve
    prefix = tree.relative_to(ROOT)
    for package, folder in sorted(dirs.items(), key=lambda kv: -kv[0].count(".")):
        text = text.replace(f"{prefix}/{package.replace('.', '/')}/", f"{folder}/")
    print(text, end="")
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())
