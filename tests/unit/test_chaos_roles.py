"""A chaos fault aimed at a pipeline role hits an instance playing it, however late the
first placement comes: on a slow machine the instances may still be booting when the
fault's time arrives, and striking whichever instance is alive then would test nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

from spotserve.operator.local.chaos import KILL, NOTICE, ChaosPlan, Fault
from spotserve.operator.local.chaos_run import ChaosRun
from spotserve.operator.local.cloud import Script
from spotserve.operator.local.runner import RunOptions
from spotserve.operator.local.tiny_model import build_tiny_llama
from spotserve.operator.planner.cluster import GpuId


def _placement(driver: str, follower: str) -> SimpleNamespace:
    stage = lambda s: SimpleNamespace(stage=s, tp_rank=0)  # noqa: E731
    return SimpleNamespace(assignment=[(stage(0), GpuId(driver, 0)),
                                       (stage(1), GpuId(follower, 0))],
                           instances=lambda: {driver, follower})


def _run(tmp_path: Path, fault: Fault) -> ChaosRun:
    plan = ChaosPlan(0, ("n1", "n2", "n3"), (fault,), 30.0)
    model = build_tiny_llama(tmp_path / "model")
    run = ChaosRun(RunOptions(model, tmp_path / "run", Script((), 30.0, "")), plan)
    run.backend = SimpleNamespace(  # type: ignore[assignment]
        instances={n: SimpleNamespace(state="ready") for n in ("n1", "n2", "n3")})
    return run


def test_a_follower_fault_waits_for_a_follower(tmp_path: Path) -> None:
    fault = Fault(0.0, NOTICE, "follower", grace=6.0, window=5.0)
    run = _run(tmp_path, fault)

    async def place_later() -> str | None:
        async def placed() -> None:
            await asyncio.sleep(0.3)   # the first placement comes after the fault's time
            run.controller = SimpleNamespace(  # type: ignore[assignment]
                placement=_placement("n3", "n1"), last_plan=None)
        task = asyncio.create_task(placed())
        target = await run._await_role("follower", fault)
        await task
        return target

    assert asyncio.run(place_later()) == "n1"


def test_a_driver_fault_strikes_anyway_once_its_window_passes(tmp_path: Path) -> None:
    fault = Fault(0.0, KILL, "driver", window=0.2)
    run = _run(tmp_path, fault)
    assert asyncio.run(run._await_role("driver", fault)) in ("n1", "n2", "n3")


def test_an_any_fault_does_not_wait(tmp_path: Path) -> None:
    fault = Fault(0.0, KILL, "any", window=60.0)
    run = _run(tmp_path, fault)
    assert asyncio.run(asyncio.wait_for(run._await_role("any", fault), 1.0)) is not None
