"""The SpotServe control loop for one served model.

Events arrive on a queue and are applied to the `ClusterView` in order. Whenever the set
of usable instances changes (a join, a notice, a loss) or the load moves past the
re-plan threshold, the controller asks the planner for the next configuration and drives
the actuator through one migration:

1. capacity — replacement capacity is requested the moment a notice arrives, and more when
   the plan says the rate cannot be met (spot first, on-demand as the fallback);
2. preload — GPUs that join the configuration (idle until now) gather the weights of their
   future position from peers or the checkpoint while the old configuration keeps serving
   (ShuntServe's concurrent initialization); skipped when a notice deadline is running,
   since the just-in-time arrangement has already spent that time on decode steps;
3. drain — every old pipeline that does not carry over unchanged stops after the decode
   steps the just-in-time arrangement allows (0 for non-doomed ones), keeping its KV;
4. configure — every GPU takes its role for the new epoch, keeping what it holds and
   pulling the rest (doomed holders first); unchanged pipelines keep serving meanwhile;
5. switch — the router gets the new pipelines and, for every drained request, where it
   resumes: from migrated KV, or by re-prefill when no new pipeline inherited it;
6. release — idle instances are given back, on-demand ones first.

Between phases, an urgent event (another notice, a loss) that touches the migration aborts
it and the controller re-plans from the state reached: drains are idempotent, weights
already moved stay, KV that can no longer be saved is dropped (its requests re-prefill).
Every transition is journaled; a restarted controller re-plans from the last committed
placement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from spotserve.catalog import Catalog
from spotserve.errors import SpotserveError
from spotserve.model_spec import ModelSpec

from ..planner.cluster import CurrentState, GpuId, Instance, PipelineProgress, Placement
from ..planner.cost_model import CostModel, Workload
from ..planner.heterogeneous import HeteroLimits
from ..planner.homogeneous import SearchLimits
from ..planner.planner import Plan, plan
from ..planner.request import PlanRequest, parse_current
from .actuator import (
    Actuator,
    ActuatorError,
    DrainedRequest,
    PipelineStatus,
    Resume,
    RoutedPipeline,
)
from .epoch import KEPT, WorkerAssignment, assignments, pipeline_ids, pipelines_to_drain
from .events import (
    Event,
    InstanceBooting,
    InstanceReady,
    LoadChanged,
    NoticeReceived,
    is_urgent,
)
from .journal import ControllerState, Journal, placement_to_dict
from .metrics import ControllerMetrics
from .view import NOTICE, ClusterView

log = logging.getLogger("spotserve.controller")


@dataclass(frozen=True)
class ControllerSettings:
    model: ModelSpec
    cost: CostModel
    catalog: Catalog = field(default_factory=Catalog.load)
    workload: Workload = field(default_factory=Workload)
    limits: SearchLimits = field(default_factory=SearchLimits)
    hetero: HeteroLimits = field(default_factory=HeteroLimits)
    spot_prices: Mapping[str, float] = field(default_factory=dict)
    grace_seconds: float = 30.0
    replan_threshold: float = 0.2  # relative load change that triggers a re-plan
    replacement_capacity: str = "spot"
    # Idle instances kept as warm standby (spot first) instead of released: the next notice
    # then has somewhere to move the doomed pipeline's position and KV at once.
    standby_instances: int = 0
    # Most ready instances one configuration may use (the LLMService's instances.max or
    # desired); None = every ready instance. Extra ones are released, unused ones first.
    max_instances: int | None = None


MAX_CONFIGURE_RETRIES = 3
TRIGGERS = ("notice", "loss", "join", "load")  # most urgent first


class MigrationAborted(Exception):
    """An urgent event touched the migration in progress; re-plan from here."""


class Controller:
    def __init__(self, settings: ControllerSettings, actuator: Actuator,
                 journal: Journal | None = None, clock: Callable[[], float] = time.time,
                 metrics: ControllerMetrics | None = None) -> None:
        self.settings, self.actuator = settings, actuator
        self.journal = journal or Journal()
        self.metrics = metrics or ControllerMetrics()
        self._notice_at: float | None = None
        self.clock = clock
        self.view = ClusterView()
        self.placement: Placement | None = None
        self.pipeline_ids: list[str] = []
        self.epoch = 0
        self.phase = "idle"
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.last_plan: Plan | None = None
        self._planned_rate = 0.0
        self._configure_failures = 0
        self._excess: tuple[str, ...] = ()  # ready instances past max_instances
        self._trigger = ""  # what started the current re-plan: notice, join, loss, load…
        self._resume_from_journal()

    # ---- events ---------------------------------------------------------------------
    async def submit(self, event: Event) -> None:
        await self.queue.put(event)

    async def run(self) -> None:
        """Process events forever (cancel the task to stop)."""
        while True:
            events = [await self.queue.get()]
            while not self.queue.empty():
                events.append(self.queue.get_nowait())
            await self.handle(events)

    async def handle(self, events: Sequence[Event]) -> None:
        """Apply `events`; re-plan (as often as urgent events keep arriving) if needed."""
        reasons = []
        self._trigger = ""
        for event in events:
            reason = await self._apply(event)
            if reason:
                reasons.append(reason)
        while reasons:
            try:
                await self.reconcile(", ".join(dict.fromkeys(reasons)))
                reasons = []
            except MigrationAborted as exc:
                reasons = [str(exc)]

    async def _apply(self, event: Event) -> str | None:
        before = self.view
        self.view = self.view.apply(event, self.clock())
        if self.view == before and not isinstance(event, LoadChanged):
            return None
        self.journal.record("event", self.epoch, event=type(event).__name__,
                            **{k: v for k, v in vars(event).items()})
        if isinstance(event, NoticeReceived):
            record = self.view.instances[event.name]
            await self._ask_capacity(record.instance_type, 1, self.settings.replacement_capacity,
                                     why=f"replace {event.name}")
            self._notice_at = self._notice_at or self.clock()
            self._count_replan("notice")
            return f"notice on {event.name}"
        if isinstance(event, LoadChanged):
            base = max(self._planned_rate, 1e-9)
            if abs(event.rate - self._planned_rate) / base <= self.settings.replan_threshold:
                return None
            self._count_replan("load")
            return f"load {self._planned_rate:g} → {event.rate:g} req/s"
        if isinstance(event, InstanceBooting):
            return None  # not usable yet: nothing to re-plan
        self._count_replan("join" if isinstance(event, InstanceReady) else "loss")
        if isinstance(event, InstanceReady):
            return f"{event.name} joined"
        return f"{type(event).__name__} {getattr(event, 'name', '')}".strip()

    def _count_replan(self, kind: str) -> None:
        """A re-plan by `kind`; the most urgent kind of a batch labels its migration."""
        self.metrics.replans.labels(kind).inc()
        if self._trigger not in TRIGGERS or TRIGGERS.index(kind) < TRIGGERS.index(self._trigger):
            self._trigger = kind

    def _urgent_pending(self, involved: set[str]) -> str | None:
        """Peek at queued events; an urgent one touching `involved` aborts the migration."""
        pending: list[Event] = []
        reason = None
        while not self.queue.empty():
            pending.append(self.queue.get_nowait())
        for event in pending:
            name = getattr(event, "name", None)
            if is_urgent(event) and name in involved and reason is None:
                reason = f"{type(event).__name__} on {name} during epoch {self.epoch}"
        for event in pending:
            self.queue.put_nowait(event)
        return reason

    async def _checkpoint(self, involved: set[str]) -> None:
        reason = self._urgent_pending(involved)
        if reason is None:
            return
        for event in [self.queue.get_nowait() for _ in range(self.queue.qsize())]:
            await self._apply(event)  # journaled, and a notice still asks for a replacement
        self.journal.record("aborted", self.epoch, phase=self.phase, reason=reason)
        self.metrics.migrations.labels(self._trigger or "other", "aborted").inc()
        raise MigrationAborted(reason)

    # ---- planning -------------------------------------------------------------------
    def _instances(self) -> tuple[Instance, ...]:
        used = self.placement.instances() if self.placement else set()
        instances = self.view.planner_instances(self.settings.catalog, used,
                                                self.settings.spot_prices)
        instances, self._excess = cap_instances(instances, used, self.settings.max_instances)
        return instances

    async def _current(self, instances: tuple[Instance, ...]
                       ) -> tuple[CurrentState | None, dict[int, float]]:
        if self.placement is None:
            return None, {}
        try:
            status = await self.actuator.progress()
        except ActuatorError:
            status = {}
        progress, steps = [], {}
        for d, pid in enumerate(self.pipeline_ids):
            s = status.get(pid, PipelineStatus())
            progress.append(PipelineProgress(d, s.cached_tokens, s.remaining_steps))
            if s.decode_step_ms > 0:
                steps[d] = s.decode_step_ms
        return CurrentState(self.placement, tuple(progress)), steps

    async def plan_next(self) -> Plan | None:
        instances = self._instances()
        if not any(i.usable for i in instances):
            return None
        current, steps = await self._current(instances)
        deadline = self.view.earliest_deadline()
        grace = self.settings.grace_seconds if deadline is None else \
            max(0.0, deadline - self.clock())
        s = self.settings
        request = PlanRequest(model=s.model, instances=instances, cost=s.cost,
                              rate=self.view.rate, workload=s.workload, grace_seconds=grace,
                              limits=s.limits, hetero=s.hetero, current=current,
                              decode_step_ms=steps)
        return plan(request)

    # ---- one migration --------------------------------------------------------------
    async def reconcile(self, reason: str, trigger: str = "") -> None:
        """Plan and, when the plan differs, migrate; `trigger` labels the metrics (by
        default the kind of the events being handled)."""
        self._trigger = trigger or self._trigger or "other"
        result = await self.plan_next()
        if result is None or result.config is None or result.mapping is None:
            self.journal.record("no-configuration", self.epoch, reason=reason)
            kind = self._any_instance_type()
            if kind:
                await self._ask_capacity(kind, max(1, result.extra_instances if result else 1),
                                         self.settings.replacement_capacity, why="no capacity")
            return
        self.last_plan = result
        self._planned_rate = self.view.rate
        old, old_ids = self.placement, list(self.pipeline_ids)
        new = result.mapping.placement
        doomed_in_use = old is not None and bool(
            old.instances() & {r.name for r in self.view.in_state(NOTICE)})
        if old is not None and new.assignment == old.assignment and not doomed_in_use:
            self.journal.record("unchanged", self.epoch, reason=reason)
            await self._release(result)  # a join the plan does not use, or past the limit
            return
        self.epoch += 1
        epoch = self.epoch
        self.journal.record("planned", epoch, reason=reason, config=result.config.describe(),
                            transfers=len(result.migration.transfers) if result.migration
                            else 0, bytes=result.migration.total_bytes if result.migration
                            else 0, seconds=result.migration.seconds if result.migration else 0)
        if not result.meets_rate and result.extra_instances:
            # spot first; the backend falls back to on-demand when spot is not to be had
            await self._ask_capacity(result.extra_instance_type, result.extra_instances,
                                     self.settings.replacement_capacity, why="rate not met")
        involved = new.instances() | (old.instances() if old else set())
        new_ids = pipeline_ids(epoch, old_ids, old, new)
        inherits = dict(result.mapping.inherits)
        jobs = assignments(self.settings.model, epoch, new,
                           result.migration.transfers if result.migration else (), old, old_ids,
                           inherits)
        await self._preload(epoch, jobs, old, involved, deadline_running=doomed_in_use)
        drained = await self._drain(epoch, result, old, old_ids, new)
        await self._checkpoint(involved)
        self._set_phase("configuring")
        kv = {o: drained.get(o, ()) for o in inherits.values()}
        try:
            self.metrics.bytes_moved.inc(await self.actuator.configure(epoch, jobs, kv))
        except ActuatorError as exc:
            await self._configure_failed(epoch, exc)
        self._configure_failures = 0
        await self._checkpoint(involved)
        self._set_phase("switching")
        await self.actuator.set_topology(epoch, self._routes(result, new, new_ids, old_ids),
                                         self._resumes(drained, inherits, new_ids))
        self.placement, self.pipeline_ids = new, new_ids
        self._set_phase("serving")
        self._count_migration(result, drained, inherits)
        self.journal.record("serving", epoch, config=result.config.describe(),
                            pipelines=new_ids)
        await self._release(result)

    async def _preload(self, epoch: int, jobs: Mapping[GpuId, WorkerAssignment],
                       old: Placement | None, involved: set[str], deadline_running: bool
                       ) -> None:
        """Concurrent initialization for the GPUs that join this epoch: they gather their
        weights while every old pipeline keeps serving. A failed preload costs nothing but
        time (configure gathers what is missing); an urgent event cancels it."""
        if old is None:
            return  # cold start: nothing serves yet, so configure loads at once
        serving = {gpu for _, gpu in old.assignment}
        gpus = sorted(g for g, job in jobs.items() if not job.unchanged and g not in serving
                      and any(p.kind != KEPT for p in job.pieces))
        if not gpus:
            return
        if deadline_running:
            self.journal.record("preload-skipped", epoch, gpus=len(gpus),
                                reason="a notice deadline is running")
            return
        self._set_phase("preloading")
        start = self.clock()
        task = asyncio.ensure_future(self.actuator.preload(epoch, jobs, gpus))
        try:
            while not (await asyncio.wait({task}, timeout=0.25))[0]:
                if self._urgent_pending(involved):
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                    await self._checkpoint(involved)  # raises MigrationAborted
            gathered = task.result()
        except ActuatorError as exc:
            self.journal.record("preload-failed", epoch, error=str(exc))
            return
        finally:
            if not task.done():
                task.cancel()
        self.metrics.bytes_preloaded.inc(gathered)
        self.metrics.bytes_moved.inc(gathered)
        self.journal.record("preloaded", epoch, gpus=[str(g) for g in gpus], bytes=gathered,
                            seconds=round(self.clock() - start, 3))

    async def _configure_failed(self, epoch: int, exc: ActuatorError) -> None:
        """A worker could not take its role (a peer died under it, say): re-plan from the
        state reached, a few times, before giving up on this event."""
        self.journal.record("configure-failed", epoch, error=str(exc))
        self.metrics.migrations.labels(self._trigger or "other", "failed").inc()
        self._configure_failures += 1
        if self._configure_failures > MAX_CONFIGURE_RETRIES:
            self._configure_failures = 0
            raise exc
        await asyncio.sleep(min(2.0, 0.5 * self._configure_failures))
        raise MigrationAborted(f"configure failed in epoch {epoch}: {exc}") from None

    def _count_migration(self, result: Plan, drained: Mapping[int, Sequence[DrainedRequest]],
                         inherits: Mapping[int, int]) -> None:
        m = self.metrics
        m.migrations.labels(self._trigger or "other", "completed").inc()
        m.epoch.set(self.epoch)
        m.bytes_planned.inc(result.migration.total_bytes if result.migration else 0)
        heirs = set(inherits.values())
        for old, requests in drained.items():
            m.resumed.labels("kv" if old in heirs else "reprefill").inc(len(requests))
        for state in ("booting", "ready", "notice", "gone"):
            m.instances.labels(state).set(len(self.view.in_state(state)))
        now = self.clock()
        deadline = self.view.earliest_deadline()
        if deadline is not None and now > deadline:
            m.deadline_misses.inc()
        if self._notice_at is not None:
            m.notice_to_serving.observe(max(0.0, now - self._notice_at))
            self._notice_at = None

    async def _drain(self, epoch: int, result: Plan, old: Placement | None,
                     old_ids: Sequence[str], new: Placement
                     ) -> dict[int, Sequence[DrainedRequest]]:
        self._set_phase("draining")
        doomed = {r.name: r for r in self.view.in_state(NOTICE)}
        budget = {a.pipeline: a.steps for a in result.arrangement}
        drained: dict[int, Sequence[DrainedRequest]] = {}
        if old is None:
            return drained
        for d in pipelines_to_drain(old, new, doomed):
            driver = old.by_position[min(p for p in old.by_position if p.pipeline == d)]
            steps = budget.get(d, 0)
            try:
                drained[d] = await self.actuator.drain(epoch, old_ids[d], driver, steps)
                self.journal.record("drained", epoch, pipeline=old_ids[d], steps=steps,
                                    requests=len(drained[d]))
            except ActuatorError as exc:
                drained[d] = ()
                self.journal.record("drain-failed", epoch, pipeline=old_ids[d], error=str(exc))
        return drained

    def _routes(self, result: Plan, new: Placement, new_ids: Sequence[str],
                old_ids: Sequence[str]) -> list[RoutedPipeline]:
        weights = result.pipeline_weights or tuple(1.0 for _ in new_ids)
        routes = [RoutedPipeline(pid, new.by_position[min(p for p in new.by_position
                                                          if p.pipeline == d)],
                                 weights[d] if d < len(weights) else 1.0)
                  for d, pid in enumerate(new_ids)]
        gone = [pid for pid in old_ids if pid not in new_ids]
        driver = routes[0].driver
        return routes + [RoutedPipeline(pid, driver, 0.0, "gone") for pid in gone]

    @staticmethod
    def _resumes(drained: Mapping[int, Sequence[DrainedRequest]], inherits: Mapping[int, int],
                 new_ids: Sequence[str]) -> list[Resume]:
        heir = {o: n for n, o in inherits.items()}
        out = []
        for old, requests in drained.items():
            for r in requests:
                if old in heir:
                    out.append(Resume(r.request_id, new_ids[heir[old]], "kv", r.kv_tokens))
                else:
                    out.append(Resume(r.request_id, "", "reprefill"))
        return out

    async def _release(self, result: Plan) -> None:
        idle = list(result.idle_instances)
        capacity = {r.name: r.capacity for r in self.view.instances.values()}
        idle.sort(key=lambda n: (capacity.get(n) != "on-demand", n))
        keep = self.settings.standby_instances
        idle = idle[:len(idle) - keep] if keep else idle
        idle += [n for n in self._excess if n not in idle]
        if not idle:
            return
        try:
            await self.actuator.release(idle)
            self.journal.record("released", self.epoch, instances=idle)
        except ActuatorError as exc:
            self.journal.record("release-failed", self.epoch, error=str(exc))

    async def _ask_capacity(self, instance_type: str, count: int, capacity: str,
                            why: str) -> None:
        try:
            await self.actuator.request_capacity(instance_type, count, capacity)
            self.journal.record("capacity-requested", self.epoch, instance_type=instance_type,
                                count=count, capacity=capacity, why=why)
        except ActuatorError as exc:
            self.journal.record("capacity-failed", self.epoch, error=str(exc))

    def _any_instance_type(self) -> str | None:
        kinds = sorted({r.instance_type for r in self.view.instances.values()})
        return kinds[0] if kinds else None

    # ---- state ----------------------------------------------------------------------
    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        self.journal.save(self.state())

    def state(self) -> ControllerState:
        return ControllerState(self.epoch, self.phase, self.view.to_dict(),
                               placement_to_dict(self.placement), list(self.pipeline_ids))

    def _resume_from_journal(self) -> None:
        saved = self.journal.load()
        if saved is None:
            return
        self.view = ClusterView.from_dict(saved.view)
        self.epoch = saved.epoch
        if saved.placement is not None:
            instances = self.view.planner_instances(self.settings.catalog,
                                                    _placed(saved.placement))
            try:
                current, _ = parse_current(saved.placement, self.settings.model, instances,
                                           "controller state")
            except SpotserveError as exc:
                log.warning("ignoring the saved placement: %s", exc)
                current = None
            self.placement = current.placement if current else None
            self.pipeline_ids = saved.pipeline_ids if current else []
        self._planned_rate = self.view.rate
        self.journal.record("resumed", self.epoch, phase=saved.phase)
        self.phase = "idle"

    def needs_replan_after_restart(self) -> bool:
        """After a restart the last migration may be half done: re-plan once."""
        return self.placement is not None or bool(self.view.instances)


def cap_instances(instances: Sequence[Instance], used: set[str], limit: int | None
                  ) -> tuple[tuple[Instance, ...], tuple[str, ...]]:
    """At most `limit` usable instances for the planner: those in use first, then spot,
    then on-demand. Returns them and the names left over, to release. An in-use instance
    over the limit (the limit was lowered) stays in as `doomed`, so the planner moves its
    positions off it like a notice would, keeping its KV."""
    usable = [i for i in instances if i.usable]
    if limit is None or len(usable) <= limit:
        return tuple(instances), ()
    keep = {i.name for i in sorted(usable, key=lambda i: (i.name not in used,
                                                          i.capacity != "spot", i.name))[:limit]}
    excess = tuple(sorted(i.name for i in usable if i.name not in keep))
    out = tuple(i if not i.usable or i.name in keep else replace(i, state="doomed")
                for i in instances if i.name in keep or not i.usable or i.name in used)
    return out, excess


def _placed(placement: Mapping[str, Any]) -> set[str]:
    return {g.rpartition("/")[0] for p in placement.get("pipelines", [])
            for s in p.get("stages", []) for g in s.get("gpus", [])}

