"""The worker fleet every backend shares, against a fake wire: what it tells workers and
the router (drains announced to the router first, at the worker's own epoch; a driver that
moved on reported broken), and its health monitor (a silent worker replaced once its
deadline passes, a serving pipeline its workers report broken reported once)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from spotserve.catalog import Catalog
from spotserve.layout import ParallelConfig, Position
from spotserve.models import resolve_model
from spotserve.operator.controller.actuator import ActuatorError, DrainedRequest, Resume
from spotserve.operator.controller.actuator import RoutedPipeline as Route
from spotserve.operator.controller.epoch import WorkerAssignment, epoch_jobs
from spotserve.operator.controller.events import Event, PipelineBroken, WorkerRestarted
from spotserve.operator.controller.fleet import FleetOptions, WorkerFleet
from spotserve.operator.controller.wire import Configured, RouterReport, WorkerReport
from spotserve.operator.planner.cluster import GpuId, Instance, Placement
from spotserve.v1 import worker_pb2

A, B = GpuId("a", 0), GpuId("b", 0)


class FakeWire:
    def __init__(self) -> None:
        self.reports: dict[str, WorkerReport] = {}
        self.silent: set[str] = set()
        self.calls: list[tuple[object, ...]] = []

    async def status(self, address: str, timeout: float) -> WorkerReport:
        if address in self.silent:
            raise ActuatorError(f"Status {address}: DEADLINE_EXCEEDED")
        return self.reports.get(address, WorkerReport(0, "standby", "", ""))

    async def drain(self, address: str, epoch: int, steps: int,
                    timeout: float) -> list[DrainedRequest]:
        self.calls.append(("drain", address, epoch, steps))
        return [DrainedRequest("r1", 4, 2, 5)]

    async def configure(self, address: str, request: worker_pb2.ConfigureRequest,
                        timeout: float) -> Configured:
        self.calls.append(("configure", address, request.epoch))
        if address in self.silent:
            raise ActuatorError(f"Configure {address}: UNAVAILABLE")
        return Configured("ready")

    async def topology(self, router: str, epoch: int, pipelines: Sequence[tuple[Route, str]],
                       resume: Sequence[Resume], max_concurrency: int,
                       timeout: float) -> None:
        self.calls.append(("topology", epoch, tuple((p.pipeline_id, p.state, a)
                                                    for p, a in pipelines)))

    async def router_stats(self, router: str, timeout: float) -> RouterReport:
        return RouterReport(0, 0.0)

    async def forget(self, address: str) -> None:
        return None

    async def close(self) -> None:
        return None


class Fleet(WorkerFleet):
    def __init__(self, wire: FakeWire) -> None:
        super().__init__(resolve_model("opt-6.7b"), wire, FleetOptions(
            model_dir="/m", max_batch=4, health_every=0.02, status_timeout=0.02,
            health_deadline=0.3))
        self.replaced: list[GpuId] = []

    def address(self, gpu: GpuId) -> str:
        return f"{gpu.instance}:1"

    def workers(self) -> Sequence[GpuId]:
        return [A, B]

    def router_addresses(self) -> Sequence[str]:
        return ["router:1"]

    def rendezvous(self, driver: GpuId, epoch: int) -> str:
        return f"{driver.instance}:2"

    async def replace_worker(self, gpu: GpuId, reason: str) -> None:
        self.replaced.append(gpu)

    async def release(self, instances: Sequence[str]) -> None:
        return None

    async def request_capacity(self, instance_type: str, count: int, capacity: str) -> None:
        return None


async def test_a_drain_is_announced_to_the_router_and_sent_at_the_workers_epoch() -> None:
    wire = FakeWire()
    fleet = Fleet(wire)
    fleet.routed, fleet.router_epoch = [Route("p0", A, 1.0), Route("p1", B, 1.0)], 3
    fleet.serving[A] = (2, ("role",))
    drained = await fleet.drain(4, "p0", A, 5, timeout=10)
    assert wire.calls[0] == ("topology", 3, (("p0", "draining", "a:1"),
                                             ("p1", "serving", "b:1")))
    assert wire.calls[1] == ("drain", "a:1", 2, 5)   # the epoch the worker is in
    assert await fleet.drain(4, "p0", A, 5, timeout=10) == drained  # idempotent
    assert len([c for c in wire.calls if c[0] == "drain"]) == 1


async def test_progress_calls_a_pipeline_whose_driver_moved_on_broken() -> None:
    wire = FakeWire()
    fleet = Fleet(wire)
    fleet.routed = [Route("p0", A, 1.0), Route("p1", B, 1.0)]
    wire.reports = {"a:1": WorkerReport(2, "ready", "p0", "", 40, 3, 20.0),
                    "b:1": WorkerReport(2, "ready", "p9", "")}
    status = await fleet.progress()
    assert not status["p0"].broken and status["p0"].cached_tokens == 40
    assert status["p1"].broken and "p9" in status["p1"].error
    # a driver that got SIGTERM drains itself, its KV kept: going, not broken
    wire.reports["a:1"] = WorkerReport(2, "stopping", "p0", "", 40, 3, 20.0)
    status = await fleet.progress()
    assert not status["p0"].broken and status["p0"].cached_tokens == 40


async def test_the_monitor_replaces_a_silent_worker_and_reports_a_broken_pipeline() -> None:
    wire = FakeWire()
    fleet = Fleet(wire)
    fleet.routed = [Route("p0", A, 1.0), Route("p1", B, 1.0)]
    wire.reports = {"a:1": WorkerReport(2, "standby", "p0", "peer timed out"),
                    "b:1": WorkerReport(2, "ready", "p1", "")}
    events: list[Event] = []

    async def sink(event: Event) -> None:
        events.append(event)

    await fleet.start(sink)
    try:
        await asyncio.sleep(0.1)
        assert events == [PipelineBroken("p0", "peer timed out")]  # once, not every round
        fleet.serving[B] = (2, ("p1",))
        wire.silent.add("b:1")  # wedged: first its pipeline is given up, then it is replaced
        for _ in range(100):
            if fleet.replaced:
                break
            await asyncio.sleep(0.02)
        assert fleet.replaced == [B]
        assert events[1] == PipelineBroken("p1", "the worker on b/0 does not answer")
        assert isinstance(events[-1], WorkerRestarted) and events[-1].name == "b"
    finally:
        await fleet.stop()


async def test_marks_add_up_until_the_switch() -> None:
    wire = FakeWire()
    fleet = Fleet(wire)
    fleet.routed, fleet.router_epoch = [Route("p0", A, 1.0), Route("p1", B, 1.0)], 3
    await fleet.abandon(["p0"])
    await fleet.drain(4, "p1", B, 0, timeout=10)   # must not bring p0 back
    last = [c for c in wire.calls if c[0] == "topology"][-1]
    assert last == ("topology", 3, (("p0", "gone", ""), ("p1", "draining", "b:1")))
    assert [p.pipeline_id for p in fleet.routed if p.state != "gone"] == ["p1"]


def _job_on_a(epoch: int) -> dict[GpuId, WorkerAssignment]:
    model = resolve_model("opt-6.7b")
    config = ParallelConfig.uniform(model.num_layers, 1, 1, 1, batch=4)
    kind = Catalog.load().instance("p4d.24xlarge")
    return epoch_jobs(model, epoch, Placement.of(config, {Position(0, 0, 0): A}), None,
                      [Instance("a", kind, state="joining")])


async def test_a_worker_that_is_gone_need_not_stand_down() -> None:
    """B left the configuration (its node is stopping, its worker gone already): telling
    it to stand down fails, and that must not fail the migration; A's role must."""
    wire = FakeWire()
    fleet = Fleet(wire)
    fleet.serving[B] = (4, ("old role",))
    wire.silent.add("b:1")
    assert await fleet.configure(5, _job_on_a(5), {}) == 0
    assert ("configure", "b:1", 5) in wire.calls and B not in fleet.serving
    fleet.serving[B] = (4, ("old role",))
    wire.silent = {"a:1"}
    with pytest.raises(ActuatorError, match="a/0"):
        await fleet.configure(6, _job_on_a(6), {})


async def test_one_rank_failing_its_configure_cancels_the_ranks_waiting_for_it() -> None:
    """A's Configure fails at once (its old pipeline broke under it); B, its partner in the
    new pipeline, waits in the rendezvous for A and would until its timeout: it is
    cancelled instead, and the configure fails now, naming A, so the controller re-plans
    without waiting minutes with nothing serving."""
    class Waiting(FakeWire):
        def __init__(self) -> None:
            super().__init__()
            self.cancelled = asyncio.Event()

        async def configure(self, address: str, request: worker_pb2.ConfigureRequest,
                            timeout: float) -> Configured:
            if address == "a:1":
                await asyncio.sleep(0.05)
                raise ActuatorError("Configure a:1: ABORTED: configure failed: peer closed")
            try:
                await asyncio.sleep(timeout)   # in the rendezvous, for A
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return Configured("ready")

    wire = Waiting()
    fleet = Fleet(wire)
    model = resolve_model("opt-6.7b")
    config = ParallelConfig.uniform(model.num_layers, 1, 2, 1, batch=4)
    kind = Catalog.load().instance("p4d.24xlarge")
    jobs = epoch_jobs(model, 5, Placement.of(config, {Position(0, 0, 0): A,
                                                      Position(0, 1, 0): B}), None,
                      [Instance("a", kind, state="joining"), Instance("b", kind, state="joining")])
    with pytest.raises(ActuatorError, match=r"a/0: .*peer closed.*b/0: cancelled"):
        await asyncio.wait_for(fleet.configure(5, jobs, {}), 5)
    assert wire.cancelled.is_set() and not fleet.serving
