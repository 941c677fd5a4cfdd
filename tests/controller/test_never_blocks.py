"""The control loop never blocks and never waits on the dead: phases run under deadlines
and are cut short by urgent events; pipelines that lost a member (an instance gone, a
worker replaced, a peer that stopped answering) are abandoned, never drained, and
regrouped; events that arrive during a phase are seen at once; `run` records failures,
retries them, and reports where it stands in `status()`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest

from spotserve.operator.controller.actuator import (
    ActuatorError,
    DrainedRequest,
    PipelineStatus,
    Sink,
)
from spotserve.operator.controller.controller import Controller
from spotserve.operator.controller.epoch import KEPT, WorkerAssignment
from spotserve.operator.controller.events import (
    InstanceLost,
    InstanceReady,
    LoadChanged,
    NoticeReceived,
    PipelineBroken,
    WorkerRestarted,
)
from spotserve.operator.planner.cluster import GpuId

from .test_controller import NODE, Recorder, ready, settings, started

pytestmark = pytest.mark.timeout(60)


class Stalling(Recorder):
    """A backend whose next configure (or drain) hangs, as one waiting on a peer would."""

    def __init__(self) -> None:
        super().__init__()
        self.stall_configure = False
        self.stall_drain = False
        self.errors: dict[str, str] = {}   # pipeline → what its driver reports

    async def progress(self) -> Mapping[str, PipelineStatus]:
        out = dict(await super().progress())
        for pid, error in self.errors.items():
            if pid in out:
                out[pid] = replace(out[pid], error=error)
        return out

    async def configure(self, epoch: int, jobs: Mapping[GpuId, WorkerAssignment],
                        kv: Mapping[int, Sequence[DrainedRequest]]) -> int:
        if self.stall_configure:
            self.stall_configure = False
            self.calls.append(("configure-stalled", epoch))
            await asyncio.sleep(3600)
        return await super().configure(epoch, jobs, kv)

    async def drain(self, epoch: int, pipeline_id: str, driver: GpuId, steps: int,
                    timeout: float) -> Sequence[DrainedRequest]:
        if self.stall_drain:
            self.calls.append(("drain-stalled", pipeline_id))
            await asyncio.sleep(3600)
        return await super().drain(epoch, pipeline_id, driver, steps, timeout)


def _quick(controller: Controller, seconds: float = 0.5) -> None:
    """Phases that gather weights get `seconds`, not the minutes a 13 GB model's transfer
    is given: the tests wait on them."""
    controller._transfer_budget = lambda: seconds  # type: ignore[method-assign]


def kinds(controller: Controller) -> list[str]:
    return [str(e["kind"]) for e in controller.journal.entries]


async def test_a_pipeline_its_workers_report_broken_is_abandoned_and_regrouped() -> None:
    actuator = Stalling()
    controller = await started(actuator)
    victim = actuator.serving()[0]
    actuator.errors[victim.pipeline_id] = "pipeline failed: peer timed out"
    actuator.calls.clear()
    await controller.handle([PipelineBroken(victim.pipeline_id, "peer timed out")])
    assert not [c for c in actuator.calls if c[0] == "drain" and
                c[1][0] == victim.pipeline_id]  # type: ignore[index]
    abandoned = next(e for e in controller.journal.entries if e["kind"] == "abandoned")
    assert abandoned["reasons"] == {victim.pipeline_id: "peer timed out"}
    assert victim.pipeline_id not in controller.pipeline_ids  # regrouped under a new id
    assert all(not j.unchanged for j in actuator.jobs.values()
               if j.gpu == victim.driver)


async def test_a_replaced_worker_holds_nothing_and_its_pipeline_regroups() -> None:
    actuator = Recorder()
    controller = await started(actuator)
    gpu = next(iter(controller.placement.by_gpu))  # type: ignore[union-attr]
    await controller.handle([WorkerRestarted(gpu.instance, gpu.index, "silent for 10 s")])
    assert "abandoned" in kinds(controller)
    job = actuator.jobs[gpu]
    assert not job.unchanged and all(p.kind != KEPT for p in job.pieces), \
        "a fresh worker holds no weights: nothing of its role may be planned as kept"


async def test_a_hung_configure_times_out_and_is_retried_without_blocking() -> None:
    actuator = Stalling()
    controller = await started(actuator, names=("a", "b"))
    _quick(controller)
    actuator.stall_configure = True
    await asyncio.wait_for(controller.handle(ready("c")), 30)  # not the hour it stalls
    assert ("configure-stalled", 2) in actuator.calls
    assert "configure-failed" in kinds(controller)
    assert kinds(controller)[-1] in ("serving", "released")
    failures = controller.status().failures
    assert failures and "took longer" in failures[-1].message


async def test_a_loss_during_a_hung_drain_aborts_it_at_once() -> None:
    actuator = Stalling()
    controller = await started(actuator, names=("a", "b", "c", "d"))
    actuator.stall_drain = True

    async def lose_soon() -> None:
        await asyncio.sleep(0.3)
        actuator.stall_drain = False
        doomed = next(p.driver.instance for p in actuator.serving()
                      if p.driver.instance != "b")
        actuator.lost.add(doomed)
        await controller.submit(InstanceLost(doomed))

    # the drain's own deadline is a notice's grace; the loss must not wait for it
    await asyncio.wait_for(asyncio.gather(
        controller.handle([NoticeReceived("b", deadline=time.time() + 3600)]), lose_soon()),
        30)
    assert any(e["kind"] == "aborted" and e["phase"] == "draining"
               for e in controller.journal.entries)
    assert kinds(controller)[-1] in ("serving", "released")


async def test_events_during_a_phase_are_seen_at_once() -> None:
    actuator = Stalling()
    controller = await started(actuator, names=("a", "b"))
    _quick(controller, 2.0)
    actuator.stall_configure = True
    task = asyncio.ensure_future(controller.handle(ready("c")))
    while controller.phase != "configuring":
        await asyncio.sleep(0.01)
    await controller.submit(InstanceReady("d", NODE))
    await asyncio.sleep(0.3)
    assert controller.phase == "configuring", "the phase is still running"
    assert controller.view.instances["d"].state == "ready", "…but the join is already seen"
    await task


async def test_a_drained_pipeline_is_regrouped_even_when_the_plan_keeps_it() -> None:
    actuator = Stalling()
    controller = await started(actuator, names=("a", "b", "c", "d"))
    before = list(controller.pipeline_ids)
    controller._drained.add(before[0])  # drained by a migration that then aborted
    await controller.reconcile("after an abort")
    assert before[0] not in controller.pipeline_ids


async def test_run_records_a_failure_retries_and_reports_its_state() -> None:
    class Flaky(Recorder):
        failures = 1

        async def set_topology(self, *args: object) -> None:
            if self.failures:
                self.failures -= 1
                raise ActuatorError("router: UNAVAILABLE")
            await super().set_topology(*args)  # type: ignore[arg-type]

    actuator = Flaky()
    controller = Controller(settings(), actuator, clock=lambda: 1000.0)
    task = asyncio.ensure_future(controller.run())
    try:
        for event in [LoadChanged(1.5), *ready("a", "b", "c")]:
            await controller.submit(event)
        for _ in range(200):
            if controller.phase == "serving":
                break
            await asyncio.sleep(0.05)
        status = controller.status()
        assert status.phase == "serving" and status.current is not None
        assert status.migration is not None and status.migration.outcome == "completed"
        assert [f.kind for f in status.failures] == ["failed"]
        assert "UNAVAILABLE" in status.failures[0].message
        assert "retry" in {e.get("reason", "")[:5] for e in controller.journal.entries}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_run_hands_the_backend_its_event_sink() -> None:
    class Reporting(Recorder):
        sink: Sink | None = None

        async def start(self, sink: Sink) -> None:
            self.sink = sink

    actuator = Reporting()
    controller = Controller(settings(), actuator, clock=lambda: 1000.0)
    task = asyncio.ensure_future(controller.run())
    try:
        while actuator.sink is None:
            await asyncio.sleep(0.01)
        await actuator.sink(InstanceReady("a", NODE))
        for _ in range(100):
            if "a" in controller.view.instances:
                break
            await asyncio.sleep(0.02)
        assert controller.view.instances["a"].state == "ready"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_unresponsive_instance_is_not_planned_on_or_waited_for() -> None:
    class Wedged(Recorder):
        silent: frozenset[str] = frozenset()

        def unresponsive(self) -> frozenset[str]:
            return self.silent

    actuator = Wedged()
    controller = await started(actuator, names=("a", "b", "c", "d"))
    hit = next(p for p in actuator.serving() if p.driver.instance == "b")
    actuator.silent = frozenset({"b"})
    await controller.handle(ready("e"))   # any re-plan while b's worker is silent
    assert controller.placement is not None and "b" not in controller.placement.instances()
    abandoned = next(e for e in controller.journal.entries if e["kind"] == "abandoned")
    assert abandoned["reasons"] == {hit.pipeline_id: "the worker on b does not answer"}
    assert ("drain", (hit.pipeline_id, 0)) not in actuator.calls
