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
