"""The SpotServe control loop for one served model.

Events arrive on a queue and are applied to the `ClusterView` in order. Whenever the set
of usable instances changes (a join, a notice, a loss), a pipeline breaks or a worker is
replaced, or the load moves past the re-plan threshold, the controller asks the planner
for the next configuration and drives the actuator through one migration:

1. capacity — replacement capacity is requested the moment a notice arrives, and more when
   the plan says the rate cannot be met (spot first, on-demand as the fallback);
2. abandon — pipelines that lost a member (an instance gone, a worker replaced, a peer
   that stopped answering) are never drained: the router drops them at once and their
   requests resume by re-prefill;
3. preload — GPUs that join the configuration (idle until now) gather the weights of their
   future position from peers or the checkpoint while the old configuration keeps serving
   (ShuntServe's concurrent initialization); skipped when a notice deadline is running,
   since the just-in-time arrangement has already spent that time on decode steps;
4. drain — every old pipeline that does not carry over unchanged stops after the decode
   steps the just-in-time arrangement allows (0 for non-doomed ones), keeping its KV;
5. configure — every GPU takes its role for the new epoch, keeping what it holds and
   pulling the rest (doomed holders first); unchanged pipelines keep serving meanwhile;
6. switch — the router gets the new pipelines and, for every drained request, where it
   resumes: from migrated KV, or by re-prefill when no new pipeline inherited it;
7. release — idle instances are given back, on-demand ones first.

No phase blocks the loop: each runs under a deadline sized to its work (and to the grace
left), and events that arrive meanwhile are applied within a moment. An urgent event (a
notice, a loss, a broken pipeline, a replaced worker) that touches the migration aborts
it, and the controller re-plans from the state reached: drains are idempotent, weights
already moved stay, KV that can no longer be saved is dropped (its requests re-prefill).
When the service shrinks, a going pipeline's requests still move with their KV: the
planner has a surviving pipeline adopt them, and that one imports their KV on its fast
path while it keeps serving.
`run` owns the loop, the retries and the error policy; `status` is its snapshot. Every
transition is journaled; a restarted controller re-plans from the last committed
placement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn, TypeVar

from spotserve.catalog import Catalog
from spotserve.errors import SpotserveError
from spotserve.model_spec import ModelSpec

from ..planner.cluster import CurrentState, GpuId, Instance, PipelineProgress, Placement
from ..planner.cost_model import CostModel, Workload
from ..planner.device_mapper import Inheritance
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
    PipelineBroken,
    WorkerRestarted,
    is_urgent,
)
from .journal import ControllerState, Journal, placement_to_dict
from .metrics import ControllerMetrics
from .status import MAX_ERRORS, ControllerStatus, Failure, MigrationStatus
from .view import GONE, NOTICE, ClusterView

log = logging.getLogger("spotserve.controller")
T = TypeVar("T")


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
    # Phase deadlines: a GPU's worker answers within `startup_seconds` (a pod scheduled and
    # started, say); every phase gets its estimated work plus `phase_margin_seconds`.
    startup_seconds: float = 60.0
    phase_margin_seconds: float = 10.0
    switch_seconds: float = 15.0
    release_seconds: float = 60.0


MAX_CONFIGURE_RETRIES = 3
RETRY_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)  # seconds before the n-th retry of a failure
TRIGGERS = ("notice", "loss", "broken", "worker", "join", "load")  # most urgent first


class MigrationAborted(Exception):
    """An urgent event touched the migration in progress; re-plan from here."""


class PhaseTimeout(ActuatorError):
    """A phase ran past its deadline (a peer that neither answers nor dies, say)."""


@dataclass(frozen=True)
class Scope:
    """What a migration touches: an urgent event on these aborts it."""

    instances: frozenset[str] = frozenset()
    kept: frozenset[str] = frozenset()  # pipelines it leaves serving as they are


@dataclass(frozen=True)
class Observed:
    """The running placement as its workers report it."""

    current: CurrentState | None
    step_ms: Mapping[int, float]
    broken: frozenset[int]   # lost a member or its KV: abandoned, never drained
    stale: frozenset[int]    # drained already: regrouped even if the plan keeps it
    why: Mapping[int, str] = field(default_factory=dict)  # why each broken one is

    @property
    def disturbed(self) -> frozenset[int]:
        return self.broken | self.stale


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
        # called with each phase the controller enters (tests and the chaos runner strike
        # at a phase however briefly it lasts)
        self.phase_listeners: list[Callable[[str], None]] = []
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.last_plan: Plan | None = None
        self.migration: MigrationStatus | None = None
        self._arrived = asyncio.Event()
        self._pending: list[tuple[str, str]] = []  # (why, kind) of re-plans not yet done
        self._planned_rate = 0.0
        self._configure_failures = 0
        self._excess: tuple[str, ...] = ()  # ready instances past max_instances
        self._trigger = ""  # what started the current re-plan: notice, join, loss, load…
        self._broken: dict[str, str] = {}  # pipeline id → why its workers say it broke
        self._wiped: set[GpuId] = set()    # GPUs whose worker was replaced (hold nothing)
        self._drained: set[str] = set()    # drained by a migration that did not commit
        self._failures: deque[Failure] = deque(maxlen=MAX_ERRORS)
        self._failure_seq = 0
        self._resume_from_journal()

    # ---- the loop ---------------------------------------------------------------------
    async def submit(self, event: Event) -> None:
        self.queue.put_nowait(event)
        self._arrived.set()

    async def run(self) -> None:
        """The control loop, until cancelled: wait for events, re-plan while they ask for
        it, and on a failure record it and retry after a back-off (events still count)."""
        await self.actuator.start(self.submit)
        try:
            if self.needs_replan_after_restart():
                self._want("restart", "controller restarted")
            failures = 0
            while True:
                if not self._pending:
                    await self._arrived.wait()
                    await self._absorb(Scope())
                    continue
                try:
                    await self._settle()
                    failures = 0
                except ActuatorError as exc:
                    failures += 1
                    self._end_migration("failed")
                    self._failed("failed", str(exc))
                    self._set_phase("failed")
                    wait = RETRY_BACKOFF[min(failures, len(RETRY_BACKOFF)) - 1]
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._arrived.wait(), wait)
                    await self._absorb(Scope())
                    self._want("retry", f"retry after: {exc}")
        finally:
            await self.actuator.stop()

    async def handle(self, events: Sequence[Event]) -> None:
        """Apply `events`; re-plan (as often as urgent events keep arriving) if needed."""
        for event in events:
            await self._apply(event)
        await self._absorb(Scope())
        await self._settle()

    async def _settle(self) -> None:
        await self._absorb(Scope())  # plan on the freshest view
        while self._pending:
            batch, self._pending = self._pending, []
            kinds = [k for _, k in batch if k in TRIGGERS]
            self._trigger = min(kinds, key=TRIGGERS.index) if kinds else batch[0][1]
            try:
                await self.reconcile(", ".join(dict.fromkeys(why for why, _ in batch)))
            except MigrationAborted as exc:
                self._pending.insert(0, (str(exc), self._trigger))

    def _want(self, kind: str, why: str) -> str:
        """A re-plan is needed, for `why`."""
        self.metrics.replans.labels(kind).inc()
        self._pending.append((why, kind))
        return why

    # ---- events -----------------------------------------------------------------------
    async def _absorb(self, scope: Scope) -> str | None:
        """Apply every queued event now; the first urgent one that touches `scope` is the
        reason to abort the migration in progress (None: carry on)."""
        self._arrived.clear()
        abort = None
        while not self.queue.empty():
            event = self.queue.get_nowait()
            why = await self._apply(event)
            if why and abort is None and is_urgent(event) and self._touches(event, scope):
                abort = f"{why} (during {self.phase} of epoch {self.epoch})"
        return abort

    @staticmethod
    def _touches(event: Event, scope: Scope) -> bool:
        if isinstance(event, PipelineBroken):
            return event.pipeline_id in scope.kept
        return getattr(event, "name", None) in scope.instances

    async def _apply(self, event: Event) -> str | None:
        """Apply one event; the reason it asks for a re-plan, if it does."""
        if isinstance(event, PipelineBroken | WorkerRestarted):
            return self._apply_failure(event)
        before = self.view
        self.view = self.view.apply(event, self.clock())
        if self.view == before and not isinstance(event, LoadChanged):
            return None
        self.journal.record("event", self.epoch, event=type(event).__name__, **vars(event))
        if isinstance(event, NoticeReceived):
            record = self.view.instances[event.name]
            await self._ask_capacity(record.instance_type, 1, self.settings.replacement_capacity,
                                     why=f"replace {event.name}")
            self._notice_at = self._notice_at or self.clock()
            return self._want("notice", f"notice on {event.name}")
        if isinstance(event, LoadChanged):
            base = max(self._planned_rate, 1e-9)
            if abs(event.rate - self._planned_rate) / base <= self.settings.replan_threshold:
                return None
            return self._want("load", f"load {self._planned_rate:g} → {event.rate:g} req/s")
        if isinstance(event, InstanceBooting):
            return None  # not usable yet: nothing to re-plan
        if isinstance(event, InstanceReady):
            return self._want("join", f"{event.name} joined")
        return self._want("loss", f"{type(event).__name__} {event.name}")

    def _apply_failure(self, event: PipelineBroken | WorkerRestarted) -> str | None:
        if isinstance(event, PipelineBroken):
            if event.pipeline_id not in self.pipeline_ids or event.pipeline_id in self._broken:
                return None
            self._broken[event.pipeline_id] = event.reason
            self.journal.record("event", self.epoch, event="PipelineBroken", **vars(event))
            return self._want("broken", f"pipeline {event.pipeline_id} broke")
        record = self.view.instances.get(event.name)
        if record is None or record.state == GONE:
            return None
        gpu = GpuId(event.name, event.gpu)
        self._wiped.add(gpu)
        self.journal.record("event", self.epoch, event="WorkerRestarted", **vars(event))
        return self._want("worker", f"worker {gpu} replaced")

    # ---- planning ---------------------------------------------------------------------
    def _instances(self) -> tuple[Instance, ...]:
        used = self.placement.instances() if self.placement else set()
        silent = self.actuator.unresponsive()
        instances = tuple(  # a wedged worker's instance: nothing on it can be counted on
            replace(i, state="lost") if i.name in silent and i.state != "lost" else i
            for i in self.view.planner_instances(self.settings.catalog, used,
                                                 self.settings.spot_prices))
        instances, self._excess = cap_instances(instances, used, self.settings.max_instances)
        return instances

    async def _observe(self) -> Observed:
        """The running pipelines as their drivers report them: broken ones (a member gone
        or replaced, an error, no answer) hold no KV worth keeping."""
        placement = self.placement
        if placement is None:
            return Observed(None, {}, frozenset(), frozenset())
        try:
            status = await asyncio.wait_for(self.actuator.progress(),
                                            self.settings.phase_margin_seconds)
        except (ActuatorError, TimeoutError):
            status = {}
        gone = {r.name for r in self.view.in_state(GONE)}
        silent = self.actuator.unresponsive()
        progress, steps, broken, stale, why = [], {}, set(), set(), {}
        for d, pid in enumerate(self.pipeline_ids):
            s = status.get(pid)
            members = {g for _, g in placement.by_pipeline.get(d, ())}
            reason = self._broken.get(pid) or (s.error if s is not None else
                                                "its driver does not answer")
            reason = reason or next((f"{g.instance} is gone" for g in sorted(members)
                                     if g.instance in gone), "")
            reason = reason or next((f"worker {g} was replaced" for g in sorted(members)
                                     if g in self._wiped), "")
            reason = reason or next((f"the worker on {g.instance} does not answer"
                                     for g in sorted(members) if g.instance in silent), "")
            if reason:
                broken.add(d)
                why[d] = reason
                s = PipelineStatus()
            elif pid in self._drained or (s is not None and s.state in ("draining",
                                                                        "drained")):
                stale.add(d)
            assert s is not None
            progress.append(PipelineProgress(d, s.cached_tokens, s.remaining_steps))
            if s.decode_step_ms > 0:
                steps[d] = s.decode_step_ms
        wiped = frozenset(g for g in self._wiped if g in placement.by_gpu)
        current = CurrentState(placement, tuple(progress), frozenset(broken), wiped)
        return Observed(current, steps, frozenset(broken), frozenset(stale), why)

    async def plan_next(self) -> tuple[Plan | None, Observed]:
        observed = await self._observe()
        instances = self._instances()
        if not any(i.usable for i in instances):
            return None, observed
        deadline = self.view.earliest_deadline()
        grace = self.settings.grace_seconds if deadline is None else \
            max(0.0, deadline - self.clock())
        s = self.settings
        request = PlanRequest(model=s.model, instances=instances, cost=s.cost,
                              rate=self.view.rate, workload=s.workload, grace_seconds=grace,
                              limits=s.limits, hetero=s.hetero, current=observed.current,
                              decode_step_ms=observed.step_ms)
        return plan(request), observed

    # ---- one migration ----------------------------------------------------------------
    async def reconcile(self, reason: str, trigger: str = "") -> None:
        """Plan and, when the plan differs, migrate; `trigger` labels the metrics (by
        default the kind of the events being handled)."""
        self._trigger = trigger or self._trigger or "other"
        result, seen = await self.plan_next()
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
        if old is not None and new.assignment == old.assignment and not doomed_in_use \
                and not seen.disturbed:
            self.journal.record("unchanged", self.epoch, reason=reason)
            await self._release(result)  # a join the plan does not use, or past the limit
            return
        await self._migrate(result, seen, old, old_ids, new, reason)

    async def _migrate(self, result: Plan, seen: Observed, old: Placement | None,
                       old_ids: list[str], new: Placement, reason: str) -> None:
        self.epoch += 1
        epoch = self.epoch
        migration = result.migration
        self.journal.record("planned", epoch, reason=reason, config=result.config.describe()
                            if result.config else "", transfers=len(migration.transfers)
                            if migration else 0, bytes=migration.total_bytes if migration
                            else 0, seconds=migration.seconds if migration else 0)
        self._start_migration(epoch, result, reason)
        if not result.meets_rate and result.extra_instances:
            # spot first; the backend falls back to on-demand when spot is not to be had
            await self._ask_capacity(result.extra_instance_type, result.extra_instances,
                                     self.settings.replacement_capacity, why="rate not met")
        new_ids = pipeline_ids(epoch, old_ids, old, new, seen.disturbed)
        scope = Scope(frozenset(new.instances() | (old.instances() if old else set())),
                      frozenset(set(new_ids) & set(old_ids)))
        inherits = result.mapping.inherits if result.mapping else ()
        jobs = assignments(self.settings.model, epoch, new,
                           migration.transfers if migration else (), old, old_ids, inherits,
                           seen.disturbed)
        await self._abandon({old_ids[d]: seen.why.get(d, "") for d in sorted(seen.broken)},
                            scope)
        deadline_running = self.view.earliest_deadline() is not None and old is not None \
            and bool(old.instances() & {r.name for r in self.view.in_state(NOTICE)})
        await self._preload(epoch, jobs, old, scope, deadline_running)
        drained = await self._drain(epoch, result, seen, old, old_ids, new, scope)
        await self._configure(epoch, jobs, inherits, drained, scope)
        routes = self._routes(result, new, new_ids, old_ids)
        await self._phase("switching", self.actuator.set_topology(
            epoch, routes, self._resumes(drained, inherits, new_ids)),
            self.settings.switch_seconds, scope)
        self.placement, self.pipeline_ids = new, new_ids
        self._broken, self._drained = {}, set()
        self._wiped.clear()
        self._set_phase("serving")
        self._count_migration(result, drained, inherits)
        self._end_migration("completed")
        self.journal.record("serving", epoch, config=result.config.describe()
                            if result.config else "", pipelines=new_ids,
                            members={pid: sorted(new.pipeline_instances(d))
                                     for d, pid in enumerate(new_ids)})
        await self._release(result)

    async def _abandon(self, reasons: Mapping[str, str], scope: Scope) -> None:
        """Broken pipelines (id → why) leave the router's rotation before anything else
        happens."""
        if not reasons:
            return
        self.metrics.abandoned.inc(len(reasons))
        self.journal.record("abandoned", self.epoch, pipelines=list(reasons),
                            reasons=dict(reasons))
        try:
            await self._phase("abandoning", self.actuator.abandon(list(reasons)),
                              self.settings.switch_seconds, scope)
        except ActuatorError as exc:  # the switch tells the router again
            self._failed("abandon-failed", str(exc))

    async def _preload(self, epoch: int, jobs: Mapping[GpuId, WorkerAssignment],
                       old: Placement | None, scope: Scope, deadline_running: bool) -> None:
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
        start = self.clock()
        try:
            gathered = await self._phase("preloading", self.actuator.preload(epoch, jobs, gpus),
                                         self._transfer_budget(), scope)
        except ActuatorError as exc:
            self._failed("preload-failed", str(exc))
            return
        self.metrics.bytes_preloaded.inc(gathered)
        self.metrics.bytes_moved.inc(gathered)
        self._add_moved(gathered)
        self.journal.record("preloaded", epoch, gpus=[str(g) for g in gpus], bytes=gathered,
                            seconds=round(self.clock() - start, 3))

    async def _drain(self, epoch: int, result: Plan, seen: Observed, old: Placement | None,
                     old_ids: Sequence[str], new: Placement, scope: Scope
                     ) -> dict[int, Sequence[DrainedRequest]]:
        """Every old pipeline that stops (and is not broken) drains, all at once, each for
        the decode steps the just-in-time arrangement gives it, within the grace left."""
        drained: dict[int, Sequence[DrainedRequest]] = {}
        if old is None:
            return drained
        doomed = {r.name: r for r in self.view.in_state(NOTICE)}
        budget = {a.pipeline: a.steps for a in result.arrangement}
        todo = [d for d in pipelines_to_drain(old, new, doomed, seen.disturbed)
                if d not in seen.broken]
        if not todo:
            return drained
        timeouts = {d: budget.get(d, 0) * seen.step_ms.get(d, 100.0) / 1000 * 2
                    + self.settings.phase_margin_seconds for d in todo}
        deadline = self.view.earliest_deadline()
        limit = max(timeouts.values())
        if deadline is not None:
            limit = min(limit, max(1.0, deadline - self.clock()))

        async def one(d: int) -> None:
            driver = old.by_position[min(p for p in old.by_position if p.pipeline == d)]
            steps = budget.get(d, 0)
            try:
                drained[d] = await self.actuator.drain(epoch, old_ids[d], driver, steps,
                                                       min(timeouts[d], limit))
                self._drained.add(old_ids[d])
                self.journal.record("drained", epoch, pipeline=old_ids[d], steps=steps,
                                    requests=len(drained[d]))
            except ActuatorError as exc:
                self._failed("drain-failed", f"{old_ids[d]}: {exc}")

        try:
            await self._phase("draining", asyncio.gather(*(one(d) for d in todo)),
                              limit + 1.0, scope)
        except PhaseTimeout as exc:
            self._failed("drain-failed", str(exc))
        for d in todo:
            drained.setdefault(d, ())  # not drained: its requests re-prefill
        return drained

    async def _configure(self, epoch: int, jobs: Mapping[GpuId, WorkerAssignment],
                         inherits: Inheritance,
                         drained: Mapping[int, Sequence[DrainedRequest]], scope: Scope) -> None:
        kv = {o: drained.get(o, ()) for _, o in inherits}
        try:
            moved = await self._phase("configuring", self.actuator.configure(epoch, jobs, kv),
                                      self._transfer_budget(), scope)
        except ActuatorError as exc:
            await self._configure_failed(epoch, exc)
        self._configure_failures = 0
        self.metrics.bytes_moved.inc(moved)
        self._add_moved(moved)

    def _transfer_budget(self) -> float:
        """Seconds for a phase that gathers weights: workers up, the planned transfer three
        times over (a busy network, a failover), and the margin."""
        plan_s = self.last_plan.migration.seconds if self.last_plan and \
            self.last_plan.migration else 0.0
        s = self.settings
        return s.startup_seconds + 3 * plan_s + s.phase_margin_seconds

    async def _phase(self, name: str, work: Awaitable[T], seconds: float, scope: Scope) -> T:
        """Run `work` as phase `name` for at most `seconds`, applying events as they come:
        an urgent one that touches `scope` cancels it (`MigrationAborted`), and so does the
        deadline (`PhaseTimeout`)."""
        self._set_phase(name)
        task = asyncio.ensure_future(work)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + seconds
        try:
            why = await self._absorb(scope)  # what arrived since the last phase ended
            if why is not None:
                self._abort(why)
            while True:
                waiter = asyncio.ensure_future(self._arrived.wait())
                done, _ = await asyncio.wait({task, waiter}, timeout=give_up - loop.time(),
                                             return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if task in done:
                    return task.result()
                why = await self._absorb(scope)
                if why is not None:
                    self._abort(why)
                if loop.time() >= give_up:
                    self.metrics.phase_timeouts.labels(name).inc()
                    raise PhaseTimeout(f"{name} took longer than {seconds:.0f} s")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=5.0)
            if task.done():  # what a cancelled gather ends with is seen, not logged
                with contextlib.suppress(BaseException):
                    task.exception()

    def _abort(self, why: str) -> None:
        self.journal.record("aborted", self.epoch, phase=self.phase, reason=why)
        self.metrics.migrations.labels(self._trigger or "other", "aborted").inc()
        self._end_migration("aborted")
        raise MigrationAborted(why)

    async def _configure_failed(self, epoch: int, exc: ActuatorError) -> NoReturn:
        """A worker could not take its role (a peer died under it, say): re-plan from the
        state reached, a few times, before giving up on this event."""
        self._failed("configure-failed", str(exc))
        self.metrics.migrations.labels(self._trigger or "other", "failed").inc()
        self._end_migration("failed")
        self._configure_failures += 1
        if self._configure_failures > MAX_CONFIGURE_RETRIES:
            self._configure_failures = 0
            raise exc
        await asyncio.sleep(min(2.0, 0.5 * self._configure_failures))
        raise MigrationAborted(f"configure failed in epoch {epoch}: {exc}") from None

    def _count_migration(self, result: Plan, drained: Mapping[int, Sequence[DrainedRequest]],
                         inherits: Inheritance) -> None:
        m = self.metrics
        m.migrations.labels(self._trigger or "other", "completed").inc()
        m.epoch.set(self.epoch)
        m.bytes_planned.inc(result.migration.total_bytes if result.migration else 0)
        heirs = {o for _, o in inherits}
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
    def _resumes(drained: Mapping[int, Sequence[DrainedRequest]], inherits: Inheritance,
                 new_ids: Sequence[str]) -> list[Resume]:
        heir = {o: n for n, o in inherits}
        out = []
        for old, requests in drained.items():
            for r in requests:
                if old in heir and r.kv_tokens > 0:
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
            await self._phase("releasing", self.actuator.release(idle),
                              self.settings.release_seconds, Scope())
            self.journal.record("released", self.epoch, instances=idle)
        except ActuatorError as exc:
            self._failed("release-failed", str(exc))
        finally:
            self._set_phase("serving" if self.placement else "idle")

    async def _ask_capacity(self, instance_type: str, count: int, capacity: str,
                            why: str) -> None:
        try:
            await asyncio.wait_for(self.actuator.request_capacity(instance_type, count,
                                                                  capacity),
                                   self.settings.switch_seconds)
            self.journal.record("capacity-requested", self.epoch, instance_type=instance_type,
                                count=count, capacity=capacity, why=why)
        except (ActuatorError, TimeoutError) as exc:
            self._failed("capacity-failed", str(exc) or "timed out")

    def _any_instance_type(self) -> str | None:
        kinds = sorted({r.instance_type for r in self.view.instances.values()})
        return kinds[0] if kinds else None

    # ---- state ------------------------------------------------------------------------
    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        for listener in self.phase_listeners:
            listener(phase)
        if self.migration is not None and not self.migration.outcome:
            self.migration = self.migration.at(phase)
        self.journal.save(self.state())

    def _failed(self, kind: str, message: str) -> None:
        """A failure the controller planned around: journaled, kept for the status."""
        self._failure_seq += 1
        self._failures.append(Failure(self._failure_seq, self.clock(), kind, message))
        self.journal.record(kind, self.epoch, error=message)
        log.warning("%s: %s", kind, message)

    def _start_migration(self, epoch: int, result: Plan, reason: str) -> None:
        doomed = tuple(r.name for r in self.view.in_state(NOTICE))
        self.migration = MigrationStatus(
            epoch, "planned", reason, self._trigger or "other", self.clock(),
            result.config.describe() if result.config else "", doomed,
            self.view.earliest_deadline(),
            result.migration.total_bytes if result.migration else 0)

    def _add_moved(self, nbytes: int) -> None:
        if self.migration is not None:
            self.migration = replace(self.migration,
                                     bytes_moved=self.migration.bytes_moved + nbytes)

    def _end_migration(self, outcome: str) -> None:
        if self.migration is not None and not self.migration.outcome:
            self.migration = replace(self.migration, outcome=outcome)

    def status(self) -> ControllerStatus:
        """A snapshot of where the controller is (for the LLMService status, say)."""
        migrating = self.migration is not None and not self.migration.outcome
        target = self.last_plan.config if migrating and self.last_plan else None
        return ControllerStatus(
            self.epoch, self.phase, self.placement.config if self.placement else None,
            target, tuple(self.pipeline_ids),
            bool(self.last_plan and self.last_plan.meets_rate and self.placement),
            self.migration, tuple(self._failures))

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
