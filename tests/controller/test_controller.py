"""The control loop against a recording actuator: cold start, notices, joins, losses,
overlapping notices and restarts."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from spotserve.catalog import Catalog
from spotserve.models import resolve_model
from spotserve.operator.controller.actuator import (
    Actuator,
    ActuatorError,
    DrainedRequest,
    PipelineStatus,
    Resume,
    RoutedPipeline,
)
from spotserve.operator.controller.controller import (
    Controller,
    ControllerSettings,
    cap_instances,
)
from spotserve.operator.controller.epoch import CHECKPOINT, WorkerAssignment
from spotserve.operator.controller.events import (
    InstanceLost,
    InstanceReady,
    LoadChanged,
    NoticeReceived,
)
from spotserve.operator.controller.journal import Journal
from spotserve.operator.planner.cluster import GpuId, Instance
from spotserve.operator.planner.homogeneous import SearchLimits
from spotserve.operator.planner.roofline import RooflineCostModel

NODE = "g4dn.12xlarge"


class Recorder(Actuator):
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.topology: list[RoutedPipeline] = []
        self.resumes: list[Resume] = []
        self.lost: set[str] = set()
        self.on_configure: list[object] = []
        self.on_drain: list[object] = []
        self.capacity: list[tuple[str, int, str]] = []
        self.jobs: dict[GpuId, WorkerAssignment] = {}

    async def progress(self) -> Mapping[str, PipelineStatus]:
        return {p.pipeline_id: PipelineStatus(cached_tokens=900, remaining_steps=60,
                                              decode_step_ms=50)
                for p in self.topology if p.state == "serving"}

    async def drain(self, epoch: int, pipeline_id: str, driver: GpuId,
                    steps: int, timeout: float) -> Sequence[DrainedRequest]:
        self.calls.append(("drain", (pipeline_id, steps)))
        if self.on_drain:
            await self.on_drain.pop(0)  # type: ignore[misc]
        if driver.instance in self.lost:
            raise ActuatorError(f"{driver} does not answer")
        return [DrainedRequest(f"{pipeline_id}-r{i}", 512, 10 + steps, 522 + steps)
                for i in range(2)]

    async def configure(self, epoch: int, jobs: Mapping[GpuId, WorkerAssignment],
                        kv: Mapping[int, Sequence[DrainedRequest]]) -> int:
        self.calls.append(("configure", epoch))
        self.jobs = dict(jobs)
        if self.on_configure:
            await self.on_configure.pop(0)  # type: ignore[misc]
        return 100 * sum(len(j.pieces) for j in jobs.values() if not j.unchanged)

    async def set_topology(self, epoch: int, pipelines: Sequence[RoutedPipeline],
                           resume: Sequence[Resume]) -> None:
        self.calls.append(("topology", epoch))
        self.topology, self.resumes = list(pipelines), list(resume)

    async def release(self, instances: Sequence[str]) -> None:
        self.calls.append(("release", tuple(instances)))

    async def request_capacity(self, instance_type: str, count: int, capacity: str) -> None:
        self.capacity.append((instance_type, count, capacity))

    def serving(self) -> list[RoutedPipeline]:
        return [p for p in self.topology if p.state == "serving"]


class Preloader(Recorder):
    """A backend that preloads: records each call, or runs `during` in its place."""

    def __init__(self) -> None:
        super().__init__()
        self.during: object | None = None
        self.cancelled = False

    async def preload(self, epoch: int, jobs: Mapping[GpuId, WorkerAssignment],
                      gpus: Sequence[GpuId]) -> int:
        self.calls.append(("preload", (epoch, tuple(gpus))))
        if self.during is not None:
            during, self.during = self.during, None
            try:
                await during  # type: ignore[misc]
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        return 1000 * len(gpus)


def settings() -> ControllerSettings:
    model = resolve_model("opt-6.7b")
    return ControllerSettings(model=model, cost=RooflineCostModel(model),
                              limits=SearchLimits(max_batch=4, min_gpus_per_replica=4,
                                                  tp_across_instances=False))


def ready(*names: str) -> list[InstanceReady]:
    return [InstanceReady(n, NODE) for n in names]


async def started(actuator: Recorder, journal: Journal | None = None,
                  names: Sequence[str] = ("a", "b", "c")) -> Controller:
    controller = Controller(settings(), actuator, journal, clock=lambda: 1000.0)
    await controller.handle([LoadChanged(1.5), *ready(*names)])
    return controller


async def test_cold_start_loads_from_the_checkpoint_and_routes_every_pipeline() -> None:
    actuator = Recorder()
    controller = await started(actuator)
    assert controller.epoch == 1 and controller.placement is not None
    assert ("configure", 1) in actuator.calls and not any(c[0] == "drain"
                                                          for c in actuator.calls)
    assert all(p.kind == CHECKPOINT for job in actuator.jobs.values() for p in job.pieces)
    assert len(actuator.serving()) == controller.placement.config.data >= 1
    assert {g.instance for g in actuator.jobs} <= {"a", "b", "c"}


async def test_notice_requests_a_replacement_drains_and_resumes_by_kv_or_reprefill() -> None:
    actuator = Recorder()
    controller = await started(actuator)
    before = {p.pipeline_id: p for p in actuator.serving()}
    doomed_pipeline = next(p for p in before.values() if p.driver.instance == "b")
    await controller.handle([NoticeReceived("b", deadline=1030.0)])
    assert actuator.capacity[0] == (NODE, 1, "spot")  # asked at once for a replacement
    drains = [c[1] for c in actuator.calls if c[0] == "drain"]
    assert drains and drains[0][0] == doomed_pipeline.pipeline_id
    assert all(job.gpu.instance != "b" for job in actuator.jobs.values())
    assert doomed_pipeline.pipeline_id not in {p.pipeline_id for p in actuator.serving()}
    resumed = {r.request_id: r for r in actuator.resumes}
    assert set(resumed) == {f"{doomed_pipeline.pipeline_id}-r{i}" for i in range(2)}
    # pipelines that were not on b kept serving untouched
    untouched = [p for p in before.values() if p.driver.instance != "b"]
    assert all(p.pipeline_id in {q.pipeline_id for q in actuator.serving()} for p in untouched)
    assert all(job.unchanged for job in actuator.jobs.values()
               if job.pipeline_id in {p.pipeline_id for p in untouched})


async def test_join_scales_out_without_touching_running_pipelines() -> None:
    actuator = Recorder()
    controller = await started(actuator, names=("a", "b"))
    before = {p.pipeline_id for p in actuator.serving()}
    actuator.calls.clear()
    await controller.handle(ready("c"))
    assert not any(c[0] == "drain" for c in actuator.calls)
    after = {p.pipeline_id for p in actuator.serving()}
    assert before < after
    new_jobs = [j for j in actuator.jobs.values() if not j.unchanged]
    assert new_jobs and all(j.gpu.instance == "c" for j in new_jobs)


async def test_a_pipeline_that_lost_a_member_is_abandoned_not_drained() -> None:
    actuator = Recorder()
    controller = await started(actuator)
    lost = next(p for p in actuator.serving() if p.driver.instance == "c")
    actuator.lost.add("c")
    await controller.handle([InstanceLost("c")])
    assert lost.pipeline_id in {p.pipeline_id for p in actuator.topology if p.state == "gone"}
    assert all(job.gpu.instance != "c" for job in actuator.jobs.values())
    assert controller.journal.entries[-1]["kind"] in ("serving", "released")
    assert ("drain", (lost.pipeline_id, 0)) not in actuator.calls  # never waits on the dead
    abandoned = [e for e in controller.journal.entries if e["kind"] == "abandoned"]
    assert abandoned and lost.pipeline_id in abandoned[0]["pipelines"]
    assert not any(r.mode == "kv" for r in actuator.resumes)


async def test_second_notice_during_a_migration_replans_from_the_state_reached() -> None:
    actuator = Recorder()
    controller = await started(actuator, names=("a", "b", "c", "d"))

    async def second_notice() -> None:
        await controller.submit(NoticeReceived("c", deadline=1040.0))

    actuator.on_configure.append(second_notice())
    await controller.handle([NoticeReceived("b", deadline=1030.0)])
    kinds = [e["kind"] for e in controller.journal.entries]
    assert "aborted" in kinds
    assert kinds.index("aborted") < len(kinds) - 1 - kinds[::-1].index("planned")
    assert controller.placement is not None
    assert controller.placement.instances() <= {"a", "d"}
    assert all(p.driver.instance in {"a", "d"} for p in actuator.serving())


async def test_a_shrink_moves_the_going_pipelines_kv_into_a_surviving_one() -> None:
    """The service shrinks on a notice (no replacement yet): the surviving pipeline keeps
    serving, imports the going pipeline's KV on its fast path, and every request of the
    going pipeline resumes there from its KV, none by re-prefill."""
    actuator = Recorder()
    controller = await started(actuator, names=("a", "b"))
    going = next(p for p in actuator.serving() if p.driver.instance == "b")
    staying = next(p for p in actuator.serving() if p.driver.instance == "a")
    actuator.calls.clear()
    await controller.handle([NoticeReceived("b", deadline=1100.0)])
    assert controller.placement is not None
    assert controller.placement.instances() == {"a"}
    assert [p.pipeline_id for p in actuator.serving()] == [staying.pipeline_id]
    assert ("drain", (staying.pipeline_id, 0)) not in actuator.calls  # it never stopped
    mine = {r.request_id: r for r in actuator.resumes
            if r.request_id.startswith(going.pipeline_id)}
    assert len(mine) == 2, mine
    assert all(r.mode == "kv" and r.pipeline_id == staying.pipeline_id
               for r in mine.values()), mine
    imports = [k for job in actuator.jobs.values() for k in job.kv]
    assert imports and all(k.src.instance == "b" for k in imports)


@pytest.mark.parametrize("hook", ["on_drain", "on_configure"])
async def test_a_join_during_a_shrink_is_planned_next_and_costs_no_kv(hook: str) -> None:
    """A replacement that joins while the going pipeline drains, or once configuring
    began, does not abort the shrink (its KV already has a home); it is planned next."""
    actuator = Recorder()
    controller = await started(actuator, names=("a", "b"))

    async def join() -> None:
        await controller.submit(InstanceReady("d", NODE))

    getattr(actuator, hook).append(join())
    await controller.handle([NoticeReceived("b", deadline=1100.0)])
    kinds = [e["kind"] for e in controller.journal.entries]
    assert "aborted" not in kinds
    assert controller.placement is not None and "d" in controller.placement.instances()
    resumed = controller.metrics.registry.get_sample_value
    assert resumed("spotserve_controller_resumed_requests_total", {"mode": "kv"}) == 2
    assert not resumed("spotserve_controller_resumed_requests_total", {"mode": "reprefill"})


async def test_restart_resumes_the_view_and_placement(tmp_path: Path) -> None:
    actuator = Recorder()
    first = await started(actuator, Journal(tmp_path))
    await first.handle([NoticeReceived("b", deadline=1030.0)])
    second = Controller(settings(), actuator, Journal(tmp_path), clock=lambda: 1001.0)
    assert second.epoch == first.epoch and second.placement == first.placement
    assert second.pipeline_ids == first.pipeline_ids
    assert second.view.instances["b"].state == "notice"
    assert (tmp_path / "events.jsonl").read_text().count('"kind": "resumed"') == 1


async def test_small_load_changes_do_not_replan() -> None:
    actuator = Recorder()
    controller = await started(actuator)
    epoch = controller.epoch
    await controller.handle([LoadChanged(1.6)])
    assert controller.epoch == epoch


@pytest.fixture(autouse=True)
def _bounded() -> None:
    asyncio.get_event_loop_policy()


async def test_metrics_count_replans_migrations_and_resumes() -> None:
    actuator = Recorder()
    controller = await started(actuator)
    await controller.handle([NoticeReceived("b", deadline=1030.0)])
    sample = controller.metrics.registry.get_sample_value
    assert sample("spotserve_replans_total", {"reason": "notice"}) == 1
    assert sample("spotserve_replans_total", {"reason": "join"}) == 3
    assert sample("spotserve_migrations_total", {"reason": "join", "outcome": "completed"}) == 1
    assert sample("spotserve_migrations_total",
                  {"reason": "notice", "outcome": "completed"}) == 1
    assert (sample("spotserve_migration_bytes_moved_total") or 0) > 0
    assert sample("spotserve_epoch") == 2
    resumed = sum(sample("spotserve_controller_resumed_requests_total", {"mode": m}) or 0
                  for m in ("kv", "reprefill"))
    assert resumed == 2
    assert sample("spotserve_notice_to_serving_seconds_count") == 1


async def test_joining_gpus_preload_their_weights_before_anything_stops() -> None:
    actuator = Preloader()
    controller = await started(actuator, names=("a", "b"))
    assert not any(c[0] == "preload" for c in actuator.calls)  # cold start: configure loads
    serving = {gpu for _, gpu in controller.placement.assignment}  # type: ignore[union-attr]
    actuator.calls.clear()
    await controller.handle(ready("c"))
    kinds = [c[0] for c in actuator.calls]
    assert kinds.index("preload") < kinds.index("configure")
    assert "drain" not in kinds or kinds.index("preload") < kinds.index("drain")
    epoch, gpus = next(c[1] for c in actuator.calls if c[0] == "preload")  # type: ignore[misc]
    assert epoch == controller.epoch and gpus
    assert all(g.instance == "c" and g not in serving for g in gpus)
    assert {g for g, j in actuator.jobs.items() if not j.unchanged} == set(gpus)
    preloaded = next(e for e in controller.journal.entries if e["kind"] == "preloaded")
    assert preloaded["bytes"] == 1000 * len(gpus)
    assert controller.metrics.registry.get_sample_value(
        "spotserve_migration_bytes_preloaded_total") == 1000 * len(gpus)


async def test_no_preload_while_a_notice_deadline_runs() -> None:
    actuator = Preloader()
    controller = await started(actuator)
    actuator.calls.clear()
    await controller.handle([InstanceReady("d", NODE), NoticeReceived("b", deadline=1030.0)])
    assert not any(c[0] == "preload" for c in actuator.calls)
    assert any(e["kind"] == "preload-skipped" for e in controller.journal.entries)
    assert any(j.gpu.instance == "d" for j in actuator.jobs.values())


async def test_a_notice_during_a_preload_cancels_it_and_replans() -> None:
    actuator = Preloader()
    controller = await started(actuator, names=("a", "b"))

    async def notice_then_wait() -> None:
        await controller.submit(NoticeReceived("a", deadline=1030.0))
        await asyncio.sleep(30)  # a slow checkpoint read; the notice must cut it short

    actuator.during = notice_then_wait()
    await asyncio.wait_for(controller.handle(ready("c")), timeout=10)
    assert actuator.cancelled
    assert any(e["kind"] == "aborted" for e in controller.journal.entries)
    assert controller.placement is not None and "a" not in controller.placement.instances()


async def test_a_failed_preload_leaves_the_gathering_to_configure() -> None:
    class Failing(Recorder):
        async def preload(self, epoch: int, jobs: Mapping[GpuId, WorkerAssignment],
                          gpus: Sequence[GpuId]) -> int:
            raise ActuatorError("c/0 does not answer")

    actuator = Failing()
    controller = await started(actuator, names=("a", "b"))
    await controller.handle(ready("c"))
    assert any(e["kind"] == "preload-failed" for e in controller.journal.entries)
    assert controller.journal.entries[-1]["kind"] in ("serving", "released")
    assert any(j.gpu.instance == "c" for j in actuator.jobs.values())


def test_cap_instances_keeps_those_in_use_then_spot() -> None:
    catalog = Catalog.load()
    kind = catalog.instance(NODE)
    fleet = [Instance("a", kind, "on-demand"), Instance("b", kind), Instance("c", kind),
             Instance("d", kind, "on-demand"), Instance("e", kind, state="doomed")]
    kept, excess = cap_instances(fleet, {"a", "e"}, 2)
    assert [(i.name, i.state) for i in kept] == [("a", "running"), ("b", "running"),
                                                 ("e", "doomed")]
    assert excess == ("c", "d")
    lowered, excess = cap_instances(fleet, {"a", "b", "c"}, 1)  # on-demand goes first
    assert [(i.name, i.state) for i in lowered] == [("a", "doomed"), ("b", "running"),
                                                    ("c", "doomed"), ("e", "doomed")]
    assert excess == ("a", "c", "d")
    assert cap_instances(fleet, set(), None) == (tuple(fleet), ())


async def test_max_instances_bounds_the_plan_and_releases_the_rest(tmp_path: Path) -> None:
    actuator = Recorder()
    capped = replace(settings(), max_instances=2)
    controller = Controller(capped, actuator, Journal(tmp_path), clock=lambda: 1000.0)
    await controller.handle([LoadChanged(1.5), *ready("a", "b", "c")])
    assert controller.placement is not None
    assert controller.placement.instances() <= {"a", "b"}
    assert ("release", ("c",)) in actuator.calls
    # the limit lowered (a spec change): the pipeline on b moves off it and b is released
    lowered = Controller(replace(settings(), max_instances=1), actuator, Journal(tmp_path),
                         clock=lambda: 1001.0)
    actuator.calls.clear()
    await lowered.reconcile("spec changed")
    assert lowered.placement is not None and lowered.placement.instances() == {"a"}
    assert any(c[0] == "release" and "b" in c[1] for c in actuator.calls)  # type: ignore[operator]
