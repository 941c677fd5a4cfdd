"""The real control plane, started once per module that asks for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .plane import ControlPlane


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd and kube-apiserver only (no scheduler, no controller-manager)."""
    plane = ControlPlane(tmp_path_factory.mktemp("plane"))
    plane.start(scheduler=False, controller_manager=False)
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The whole control plane: etcd, API server, scheduler, controller-manager."""
    plane = ControlPlane(tmp_path_factory.mktemp("cluster"))
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def pod_network() -> None:
    """The private network namespace the session entered (tests/conftest.py does it at
    collection, before any thread): pods get routable addresses there."""
    from . import podnet
    reason = podnet.enter()
    if reason is not None:
        pytest.fail(f"no pod network: {reason}")
