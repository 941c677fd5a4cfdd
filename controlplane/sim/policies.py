"""Approaches, each a policy over the same event stream (see engine.py).

- `SpotServe`: on every notice, join or rate change, the planner's `plan` over the current
  placement and progress: new configuration, Kuhn–Munkres mapping, migration estimate,
  just-in-time arrangement. Doomed pipelines decode their arranged steps, then every
  pipeline that is not kept in place stops; after the planner's migration time the new
  pipelines start, those inheriting a KV cache resume where they stopped, the others
  re-prefill their committed tokens. The cumulative ablations switch parts off:
  no controller (P, M, B fixed; only D adapts), no migration planner (nothing runs during
  a migration), no interruption arranger (no KV resume, doomed pipelines stop at the
  notice), no device mapper (positions placed in name order).
- `Reparallelize` and `Reroute`, the paper's baselines, as the SpotServe artifact ran them
  (its branch `artifact`): after a notice the old engines keep serving until their
  migration estimate (0.5 s) before the termination, taking new batches while a whole
  one fits, and what they have not finished then restarts from scratch (no KV, no
  committed tokens kept). Weights are reloaded from each instance's local disk, all
  instances at once, then the engine starts.
  `Reparallelize`: on every change, a new configuration on the usable instances; every
  engine stops and restarts. `Reroute`: P, M, B fixed at the best configuration for the
  most instances of the trace; pipelines on a doomed instance close; a new pipeline
  forms only from a whole group of idle instances, and starts twice over (the
  artifact's engine waits out its start-up again once the weights are in).
Every timing parameter, with its source: docs/simulator.md.
On-demand is `SpotServe` over a fixed set of on-demand instances (nothing ever changes).
"""

from __future__ import annotations

from dataclasses import dataclass

from spotserve.layout import ParallelConfig

from ..controller.epoch import unchanged_pipelines
from ..planner.cluster import CurrentState, Instance, PipelineProgress, Placement
from ..planner.device_mapper import Inheritance, choose_inheritance, map_devices
from ..planner.homogeneous import PipelineShape, pipeline_shapes, search
from ..planner.migration import migration_plan
from ..planner.planner import just_in_time, placed_stages, plan
from ..planner.request import PlanRequest
from . import adapter
from .engine import Pipeline, Request, Simulation
from .scenario import Scenario


@dataclass(frozen=True)
class Variant:
    """Which SpotServe components are on (the ablations switch them off cumulatively)."""

    controller: bool = True
    migration_planner: bool = True
    arranger: bool = True
    device_mapper: bool = True


@dataclass(frozen=True)
class Decision:
    placement: Placement
    inherits: Inheritance         # (new pipeline, old pipeline whose KV it takes)
    migration_s: float
    bytes_moved: int
    stop_after: dict[int, float]  # doomed old pipeline → seconds after now it stops
    micro: tuple[int, int]


class _Deployer:
    """Turns placements into engine pipelines with the planner's timings."""

    resumes = True

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self._timings: dict[tuple[object, ...], adapter.Timing] = {}

    def pipeline(self, sim: Simulation, placement: Placement, d: int, micro: tuple[int, int],
                 available_s: float) -> Pipeline:
        types = {g.instance: sim.cluster.node_type(g.instance)
                 for _, g in placement.assignment}
        stages = placed_stages(placement, d, types)
        key = (stages, micro)
        if key not in self._timings:
            self._timings[key] = adapter.timing(self.scenario.cost, stages, micro[0], micro[1],
                                                self.scenario.workload)
        instances = frozenset(placement.pipeline_instances(d))
        return Pipeline(sim.new_uid(), instances, placement.config.batch, self._timings[key],
                        available_s, label=placement.config.describe())

    def start(self, sim: Simulation) -> None:
        sim.keep_committed_on_loss = self.resumes

    def cold_load_s(self, sim: Simulation, placement: Placement,
                    instances: tuple[Instance, ...]) -> float:
        """A baseline's engines starting on `placement` (0 for the warm start at time 0):
        every instance reads its shards of the checkpoint from its own disk, all at once,
        then the engine starts (`engine_start_s`)."""
        if sim.now == 0:
            return 0.0
        scenario = self.scenario
        cold = migration_plan(scenario.model, None, placement, (), instances,
                              scenario.engine_start_s, scenario.disk_bytes_per_s)
        sim.counters.reloads += 1
        sim.counters.bytes_moved += cold.total_bytes
        return cold.seconds

    def whole_batch_s(self, pipeline: Pipeline) -> float:
        """A full batch of the workload's longest requests on `pipeline`, start to end."""
        prefill_s, step_s, overhead_s = pipeline.timing(pipeline.batch)
        return prefill_s + self.scenario.workload.output_tokens * step_s + overhead_s

    def cut_time(self, sim: Simulation, nodes: tuple[str, ...]) -> float:
        """When a baseline stops the engines on `nodes` after their notice: its migration
        estimate (`baseline_cut_s`) before the first termination."""
        deadline = min(sim.doomed[n] for n in nodes)
        return max(sim.now, deadline - self.scenario.baseline_cut_s)


class SpotServe(_Deployer):
    def __init__(self, scenario: Scenario, name: str = "spotserve",
                 variant: Variant = Variant(), fixed: PipelineShape | None = None) -> None:
        super().__init__(scenario)
        self.name, self.variant, self.fixed = name, variant, fixed
        self.resumes = True
        self.placement: Placement | None = None
        self.uids: list[int] = []
        self.micro = (1, 1)
        self.busy_until = -1.0
        self.pending = False
        self._shapes: list[PipelineShape] | None = None

    def on_notice(self, sim: Simulation, nodes: tuple[str, ...]) -> None:
        self.replan(sim)

    def on_ready(self, sim: Simulation, nodes: tuple[str, ...]) -> None:
        self.replan(sim)

    def on_rate(self, sim: Simulation) -> None:
        self.replan(sim)

    def on_removed(self, sim: Simulation, nodes: tuple[str, ...]) -> None:
        if self.placement is not None and (self.placement.instances() & set(nodes)):
            self.replan(sim, lost=nodes)

    # -- planning ---------------------------------------------------------------------
    def replan(self, sim: Simulation, lost: tuple[str, ...] = ()) -> None:
        if sim.now < self.busy_until:
            self.pending = True
            return
        hosts = sim.usable()
        decision = self.decide(sim, lost) if hosts else None
        sim.counters.replans += 1
        if decision is None:
            self._stop_all(sim)
            return
        if self.placement is not None and decision.placement == self.placement:
            return
        if decision.bytes_moved:
            sim.counters.migrations += 1
            sim.counters.bytes_moved += decision.bytes_moved
            sim.counters.migration_s += decision.migration_s
        switch_at = sim.now + max(decision.stop_after.values(), default=0.0)
        self.busy_until = switch_at + decision.migration_s
        sim.at(switch_at, self._switch, sim, decision)
        sim.at(self.busy_until, self._settled, sim)

    def decide(self, sim: Simulation, lost: tuple[str, ...]) -> Decision | None:
        nodes = sorted(sim.ready)
        stale = tuple(n for n in (self.placement.instances() if self.placement else ())
                      if n not in sim.ready) + lost
        instances = self.scenario.instances(sim, nodes, stale)
        current, steps = self._current(sim)
        deadline = min((t for t in sim.doomed.values()), default=sim.now) - sim.now
        request = self.scenario.request(instances, sim.rate, current=current,
                                        decode_step_ms=steps, grace_seconds=max(0.0, deadline))
        v = self.variant
        if v.controller and v.migration_planner and v.arranger and v.device_mapper:
            result = plan(request)
            if result.config is None or result.mapping is None or result.migration is None:
                return None
            warm = sim.now == 0 and self.placement is None
            return Decision(result.mapping.placement, result.mapping.inherits,
                            0.0 if warm else result.migration.seconds,
                            0 if warm else result.migration.total_bytes,
                            {a.pipeline: a.stop_after_s for a in result.arrangement},
                            (result.prefill_micro, result.decode_micro))
        return self._ablated(sim, request)

    def _ablated(self, sim: Simulation, request: PlanRequest) -> Decision | None:
        scenario, v = self.scenario, self.variant
        instances, current = request.instances, request.current
        hosts = [i for i in instances if i.usable]
        config, micro = self._config(sim, instances, hosts)
        if config is None:
            return None
        if v.device_mapper:
            mapping = map_devices(scenario.model, config, instances, current)
            placement, inherits = mapping.placement, mapping.inherits
        else:
            placement = adapter.naive_placement(config, hosts)
            readable = {i.name for i in instances if i.state != "lost"}
            inherits = choose_inheritance(current, config, readable)
        migration = migration_plan(scenario.model, current, placement, inherits, instances,
                                   scenario.migration_overhead_s)
        warm = sim.now == 0 and self.placement is None
        stop_after: dict[int, float] = {}
        if v.arranger:
            stop_after = {a.pipeline: a.stop_after_s
                          for a in just_in_time(request, migration.seconds)}
        return Decision(placement, inherits, 0.0 if warm else migration.seconds,
                        0 if warm else migration.total_bytes, stop_after, micro)

    def _config(self, sim: Simulation, instances: tuple[Instance, ...], hosts: list[Instance]
                ) -> tuple[ParallelConfig | None, tuple[int, int]]:
        scenario = self.scenario
        if self.variant.controller or self.fixed is None:
            result = plan(scenario.request(instances, sim.rate))
            return result.config, (result.prefill_micro, result.decode_micro)
        if self._shapes is None:
            shapes = pipeline_shapes(scenario.model, scenario.cost, hosts[0].type,
                                     scenario.workload, scenario.limits)
            self._shapes = adapter.fixed_shape(shapes, self.fixed)
        config, shape = adapter.config_of_shape(scenario.model, self._shapes, hosts, sim.rate)
        if shape is None:
            return None, (1, 1)
        return config, (shape.prefill_micro, shape.decode_micro)

    def _current(self, sim: Simulation) -> tuple[CurrentState | None, dict[int, float]]:
        if self.placement is None:
            return None, {}
        progress, steps = [], {}
        for d, uid in enumerate(self.uids):
            p = sim.pipelines.get(uid)
            if p is None:
                continue
            cached, left = self._progress(sim, p)
            if not self.variant.arranger:
                cached = 0
            progress.append(PipelineProgress(d, cached, left))
            if p.running is not None:
                steps[d] = p.running.step_s * 1000
            elif p.resume:
                steps[d] = p.timing(len(p.resume))[1] * 1000
        return CurrentState(self.placement, tuple(progress)), steps

    @staticmethod
    def _progress(sim: Simulation, p: Pipeline) -> tuple[int, int]:
        batch, cached, left = p.running, 0, 0
        for r in p.resume:
            cached += r.arrival.input_tokens + r.done_tokens
            left = max(left, r.remaining)
        if batch is not None and sim.now >= batch.prefill_end_s:
            for r in batch.requests:
                done = batch.decoded(r, sim.now)
                cached += r.arrival.input_tokens + r.done_tokens + done
                left = max(left, r.remaining - done)
        return cached, left

    # -- transitions ------------------------------------------------------------------
    def _switch(self, sim: Simulation, decision: Decision) -> None:
        new = decision.placement
        if not new.instances() <= set(sim.usable()):
            # an instance of the new placement went away before the switch: plan again
            self.busy_until = sim.now
            self.replan(sim)
            return
        kept = self._kept(sim, new) if self.variant.migration_planner else {}
        heirs = {old: n for n, old in decision.inherits} if self.variant.arranger else {}
        carried: dict[int, list[Request]] = {}
        for d, uid in enumerate(self.uids):
            p = sim.pipelines.get(uid)
            if p is None or d in kept.values():
                continue
            requests = sim.interrupt(p, keep_kv=True) + p.resume
            p.resume = []
            sim.pipelines.pop(uid)
            heir = heirs.get(d)
            if heir is not None and self._kv_survives(sim, p, decision):
                carried.setdefault(heir, []).extend(requests)
            else:
                sim.requeue(requests, keep_committed=True)
        available = sim.now + decision.migration_s
        uids = []
        for n in range(new.config.data):
            if n in kept:
                uid = self.uids[kept[n]]
                uids.append(uid)
                if n in carried:  # a pipeline that keeps serving takes the KV in
                    sim.at(available, self._take_over, sim, uid, carried[n])
                continue
            pipe = self.pipeline(sim, new, n, decision.micro, available)
            pipe.resume = carried.get(n, [])
            for r in pipe.resume:
                r.kv_pipeline = pipe.uid
            sim.add_pipeline(pipe)
            uids.append(pipe.uid)
        self.placement, self.uids, self.micro = new, uids, decision.micro
        sim.record("switch", new.config.describe())

    @staticmethod
    def _take_over(sim: Simulation, uid: int, requests: list[Request]) -> None:
        """Requests whose KV a serving pipeline imported join it, once the KV is there
        (re-queued, from their committed tokens, when that pipeline is gone since)."""
        p = sim.pipelines.get(uid)
        if p is None:
            sim.requeue(requests, keep_committed=True)
        else:
            p.resume.extend(requests)
            for r in requests:
                r.kv_pipeline = uid
        sim.dispatch()

    def _kv_survives(self, sim: Simulation, old: Pipeline, decision: Decision) -> bool:
        """The KV cache can be read until the migration ends (no instance gone before)."""
        end = sim.now + decision.migration_s
        return all(n in sim.ready and sim.doomed.get(n, end) >= end for n in old.instances)

    def _kept(self, sim: Simulation, new: Placement) -> dict[int, int]:
        """New pipeline → old pipeline running exactly its positions already: the
        controller's `unchanged_pipelines`, a pipeline the simulation closed since (it lost
        an instance) counting as disturbed, as a broken one does there."""
        gone = [d for d, uid in enumerate(self.uids) if uid not in sim.pipelines]
        return unchanged_pipelines(self.placement, new, gone)

    def _settled(self, sim: Simulation) -> None:
        if self.pending and sim.now >= self.busy_until:
            self.pending = False
            self.replan(sim)

    def _stop_all(self, sim: Simulation) -> None:
        for uid in self.uids:
            p = sim.pipelines.get(uid)
            if p is not None:
                sim.close(p, keep_committed=True)
        self.placement, self.uids = None, []
        sim.record("no-config", "none")


class Reparallelize(_Deployer):
    """On every change, the configuration the planner picks for the usable instances.
    After a notice the old engines keep serving (`serve_until`) until the cut before the
    termination; then every engine stops, reloads its weights from its instance's disk
    and starts again; interrupted requests restart from scratch."""

    name = "reparallelize"
    resumes = False

    def __init__(self, scenario: Scenario) -> None:
        super().__init__(scenario)
        self.restarts = 0
        self.in_use: frozenset[str] = frozenset()

    def on_notice(self, sim: Simulation, nodes: tuple[str, ...]) -> None:
        cut = self.cut_time(sim, nodes)
        for p in list(sim.pipelines.values()):
            sim.serve_until(p, cut, self.whole_batch_s(p))
        sim.at(cut, self._cut, sim, self.restarts)

    def _cut(self, sim: Simulation, restarts: int) -> None:
        if restarts == self.restarts:   # no restart since the notice did it already
            self.restart(sim)

    def on_ready(self, sim: Simulation, nodes: tuple[str, ...]) -> None:
        self.restart(sim)

    def on_removed(self, sim: Simulation, nodes: tuple[str, ...]) -> None:
        if self.in_use & set(nodes):   # gone without a cut before (no notice)
            self.restart(sim)

    def on_rate(self, sim: Simulation) -> None:
        self.restart(sim)

    def restart(self, sim: Simulation) -> None:
        self.restarts += 1
        self.in_use = frozenset()
        for p in list(sim.pipelines.values()):
            sim.close(p, keep_committed=False)
        sim.counters.replans += 1
        hosts = sim.usable()
        if not hosts:
            return
        instances = self.scenario.instances(sim, hosts)
        result = plan(self.scenario.request(instances, sim.rate))
        if result.config is None or result.mapping is None:
            sim.record("no-config", "none")
            return
        placement = result.mapping.placement
        self.in_use = frozenset(placement.instances())
        available = sim.now + self.cold_load_s(sim, placement, instances)
        for d in range(result.config.data):
            sim.add_pipeline(self.pipeline(sim, placement, d, (result.prefill_micro,
                                                               result.decode_micro), available))
        sim.record("restart", result.config.describe())


class Reroute(_Deployer):
    """P, M and B fixed to the planner's choice for the most instances of the trace; only
    D changes. After a notice the pipelines on the doomed instances keep serving until
    the cut, then close (their requests restart from scratch elsewhere); a new pipeline
    forms only from a whole group of idle instances, which read the weights from their
    disks and start twice over (`reroute_start_factor`: the artifact's engine waits out
    its start-up again once the weights are in)."""

    name = "reroute"
    resumes = False

    def __init__(self, scenario: Scenario, shape: PipelineShape, gpus_per_instance: int) -> None:
        super().__init__(scenario)
        self.shape = shape
        per_pipeline = shape.pipeline * shape.tensor
        block_gpus = per_pipeline * gpus_per_instance // _gcd(per_pipeline, gpus_per_instance)
        self.block_instances = block_gpus // gpus_per_instance
        self.block_pipelines = block_gpus // per_pipeline
        self.blocks: dict[frozenset[str], list[int]] = {}

    def on_notice(self, sim: Simulation, nodes: tuple[str, ...]) -> None:
        cut = self.cut_time(sim, nodes)
        for block in [b for b in self.blocks if b & set(nodes)]:
            for uid in self.blocks[block]:
                if uid in sim.pipelines:
                    p = sim.pipelines[uid]
                    sim.serve_until(p, cut, self.whole_batch_s(p))
        sim.at(cut, self._close_blocks, sim, nodes)

    def on_ready(self, sim: Simulation, nodes: tuple[str, ...]) -> None:
        self.form(sim)

    def on_removed(self, sim: Simulation, nodes: tuple[str, ...]) -> None:
        self._close_blocks(sim, nodes)

    def _close_blocks(self, sim: Simulation, nodes: tuple[str, ...]) -> None:
        for block in [b for b in self.blocks if b & set(nodes)]:
            for uid in self.blocks.pop(block):
                if uid in sim.pipelines:
                    sim.close(sim.pipelines[uid], keep_committed=False)
        self.form(sim)

    def on_rate(self, sim: Simulation) -> None:
        pass

    def form(self, sim: Simulation) -> None:
        used = set().union(*self.blocks) if self.blocks else set()
        idle = [n for n in sim.usable() if n not in used]
        s = self.shape
        while len(idle) >= self.block_instances:
            nodes, idle = idle[:self.block_instances], idle[self.block_instances:]
            instances = self.scenario.instances(sim, nodes)
            config = ParallelConfig.uniform(self.scenario.model.num_layers,
                                            self.block_pipelines, s.pipeline, s.tensor, s.batch)
            placement = map_devices(self.scenario.model, config, instances).placement
            start_s = self.cold_load_s(sim, placement, instances)
            available = sim.now + self.scenario.reroute_start_factor * start_s
            uids = []
            for d in range(config.data):
                pipe = self.pipeline(sim, placement, d, (s.prefill_micro, s.decode_micro),
                                     available)
                sim.add_pipeline(pipe)
                uids.append(pipe.uid)
            self.blocks[frozenset(nodes)] = uids
        sim.record("reroute", f"D={len(sim.pipelines)} P={s.pipeline} M={s.tensor} B={s.batch}")


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def best_shape(scenario: Scenario, sim_rate: float, instances: tuple[Instance, ...]
               ) -> PipelineShape | None:
    """The shape the planner picks on `instances` (one type): Reroute's and the fixed-shape
    ablations' configuration."""
    result = search(scenario.model, scenario.cost, instances[0].type,
                    [i.price for i in instances], scenario.workload, sim_rate, scenario.limits)
    return None if result.best is None else result.best.shape
