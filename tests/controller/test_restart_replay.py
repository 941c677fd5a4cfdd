"""A controller restarted in the middle of things learns the instances' state afresh: the
local backend says every instance's state again (as the operator relearns it from the
Nodes), so an instance lost while no controller was listening is never planned on."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotserve.catalog import Catalog
from spotserve.models import resolve_model
from spotserve.operator.controller.actuator import ActuatorError
from spotserve.operator.controller.controller import Controller
from spotserve.operator.controller.events import (
    InstanceBooting,
    InstanceLost,
    InstanceReady,
    NoticeReceived,
)
from spotserve.operator.controller.journal import Journal
from spotserve.operator.local.backend import BackendOptions, LocalBackend, LocalInstance
from spotserve.operator.local.runner import CATALOG
from spotserve.operator.planner.cluster import GpuId

from .test_controller import Recorder, settings, started


def _backend(tmp: Path) -> LocalBackend:
    backend = LocalBackend(resolve_model("opt-6.7b"), Catalog.load(CATALOG), BackendOptions(
        model_dir=tmp, workdir=tmp, router_addresses=("127.0.0.1:1",), token="t"))
    backend.instances = {
        "a": LocalInstance("a", "cpu-1x", "spot", "127.0.0.2", "ready"),
        "b": LocalInstance("b", "cpu-1x", "spot", "127.0.0.3", "notice", deadline=99.0),
        "c": LocalInstance("c", "cpu-1x", "spot", "127.0.0.4", "gone"),
        "d": LocalInstance("d", "cpu-1x", "on-demand", "127.0.0.5", "booting")}
    return backend


def test_the_backend_says_every_instance_state_again(tmp_path: Path) -> None:
    events = _backend(tmp_path).state_events()
    assert events == [InstanceReady("a", "cpu-1x", "spot"), InstanceReady("b", "cpu-1x", "spot"),
                      NoticeReceived("b", 99.0, "emulator"), InstanceLost("c"),
                      InstanceBooting("d", "cpu-1x", "on-demand")]


async def test_a_gone_instance_fails_the_configure_and_is_said_again(tmp_path: Path) -> None:
    backend = _backend(tmp_path)
    with pytest.raises(ActuatorError, match="c are gone"):
        await backend.ensure_workers(3, [GpuId("a", 0), GpuId("c", 0)])
    assert backend.events.get_nowait() == InstanceLost("c")


async def test_a_restarted_controller_applies_what_it_missed(tmp_path: Path) -> None:
    actuator = Recorder()
    first = await started(actuator, Journal(tmp_path))
    lost = next(iter(first.placement.instances()))  # type: ignore[union-attr]
    second = Controller(settings(), actuator, Journal(tmp_path), clock=lambda: 1001.0)
    second.queue.put_nowait(InstanceLost(lost))  # what the backend says again at start
    second._want("restart", "controller restarted")
    await second._settle()
    assert second.placement is not None and lost not in second.placement.instances()
