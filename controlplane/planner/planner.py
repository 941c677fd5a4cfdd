"""`plan(PlanRequest) -> Plan`: search, map, migrate, arrange, in one deterministic call.

The configuration search is homogeneous (SpotServe) when every usable instance is of one
type and heterogeneous (ShuntServe) otherwise, unless the request forces one. The device
mapper then places it on the usable instances, the migration plan says what moves where,
and pipelines on doomed instances get their just-in-time decode budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spotserve.catalog import InstanceType
from spotserve.errors import SpotserveError
from spotserve.layout import ParallelConfig, Position

from . import heterogeneous, homogeneous
from .arrangement import Arrangement, arrange
from .cluster import CurrentState, Instance, Placement
from .cost_model import StageHardware, pipeline_times
from .device_mapper import MappingResult, map_devices
from .migration import MigrationPlan, migration_plan
from .request import PlanRequest


@dataclass(frozen=True)
class Plan:
    strategy: str  # homogeneous | heterogeneous
    config: ParallelConfig | None
    prefill_micro: int
    decode_micro: int
    latency_ms: float
    throughput: float
    rate: float
    meets_rate: bool
    cost_per_hour: float
    extra_instances: int
    extra_instance_type: str
    extra_capacity: str
    pipeline_weights: tuple[float, ...]
    pipeline_latency_ms: tuple[float, ...]
    mapping: MappingResult | None
    migration: MigrationPlan | None
    arrangement: tuple[Arrangement, ...]
    requeued_pipelines: tuple[int, ...]
    idle_instances: tuple[str, ...]
    cost_model: str

    def to_dict(self) -> dict[str, Any]:
        from .render import plan_to_dict
        return plan_to_dict(self)

    def summary(self) -> str:
        from .render import plan_summary
        return plan_summary(self)


@dataclass(frozen=True)
class _Choice:
    strategy: str
    config: ParallelConfig | None
    m1: int
    m2: int
    latency_ms: float
    throughput: float
    meets: bool
    extra: int
    extra_type: str
    weights: tuple[float, ...]
    latencies: tuple[float, ...]


def plan(request: PlanRequest) -> Plan:
    """The next configuration, its placement, migration and arrangement."""
    hosts = [i for i in request.instances if i.usable]
    if not hosts:
        raise SpotserveError("no usable instances (running or joining) to plan on")
    choice = _search(request, hosts)
    if choice.config is None:
        return _plan(request, choice, None, None, ())
    mapping = map_devices(request.model, choice.config, request.instances, request.current)
    migration = migration_plan(request.model, request.current, mapping.placement,
                               mapping.inherits, request.instances,
                               request.migration_overhead_s, request.local_disk_bytes_per_s)
    return _plan(request, choice, mapping, migration,
                 just_in_time(request, migration.seconds))


def _plan(request: PlanRequest, c: _Choice, mapping: MappingResult | None,
          migration: MigrationPlan | None, arrangement: tuple[Arrangement, ...]) -> Plan:
    used = mapping.placement.instances() if mapping else set()
    hosts = [i for i in request.instances if i.usable]
    return Plan(
        strategy=c.strategy, config=c.config, prefill_micro=c.m1, decode_micro=c.m2,
        latency_ms=c.latency_ms, throughput=c.throughput, rate=request.rate,
        meets_rate=c.meets, cost_per_hour=sum(i.price for i in hosts if i.name in used),
        extra_instances=c.extra, extra_instance_type=c.extra_type,
        extra_capacity=request.extra_capacity, pipeline_weights=c.weights,
        pipeline_latency_ms=c.latencies, mapping=mapping, migration=migration,
        arrangement=arrangement,
        requeued_pipelines=_requeued(request.current, mapping, arrangement),
        idle_instances=tuple(sorted(i.name for i in hosts if i.name not in used)),
        cost_model=request.cost.name)


def _search(request: PlanRequest, hosts: list[Instance]) -> _Choice:
    types = {i.type.name for i in hosts}
    strategy = request.strategy
    if strategy == "auto":
        strategy = "homogeneous" if len(types) == 1 else "heterogeneous"
    if strategy == "homogeneous":
        if len(types) != 1:
            raise SpotserveError(f"homogeneous planning needs one instance type; the usable "
                                 f"instances have {', '.join(sorted(types))}")
        return _homogeneous(request, hosts)
    return _heterogeneous(request, hosts)


def _homogeneous(request: PlanRequest, hosts: list[Instance]) -> _Choice:
    itype = hosts[0].type
    if not any(request.cost.supports(itype.gpu, m) for m in range(1, 4 * itype.gpus + 1)):
        raise SpotserveError(f"the {request.cost.name} cost model cannot cost {itype.gpu.name} "
                             f"GPUs (a profile table covers only the GPU it was measured on)")
    result = homogeneous.search(request.model, request.cost, itype, [h.price for h in hosts],
                                request.workload, request.rate, request.limits)
    best = result.best
    if best is None:
        return _Choice("homogeneous", None, 1, 1, math.inf, 0.0, False,
                       result.extra_instances, itype.name, (), ())
    config = best.config(request.model)
    weights = tuple(1.0 / best.data for _ in range(best.data))
    return _Choice("homogeneous", config, best.shape.prefill_micro, best.shape.decode_micro,
                   best.latency_ms, best.throughput, result.meets_rate,
                   result.extra_instances, itype.name, weights,
                   tuple(best.latency_ms for _ in range(best.data)))


def _heterogeneous(request: PlanRequest, hosts: list[Instance]) -> _Choice:
    result = heterogeneous.search(request.model, request.cost, hosts, request.workload,
                                  request.rate, request.hetero)
    if result is None or not result.pipelines:
        return _Choice("heterogeneous", None, 1, 1, math.inf, 0.0, False, 0, "", (), ())
    types = {h.type.name: h.type for h in hosts}
    top = result.pipelines[0]
    extra = 0
    if not result.meets_rate:
        extra = len(top.stages) * math.ceil((request.rate - result.throughput)
                                            / top.throughput)
    return _Choice("heterogeneous", result.config(types), result.prefill_micro,
                   result.decode_micro, max(p.latency_ms for p in result.pipelines),
                   result.throughput, result.meets_rate, extra,
                   top.stages[0].instance_type, result.weights,
                   tuple(p.latency_ms for p in result.pipelines))


def _requeued(current: CurrentState | None, mapping: MappingResult | None,
              arrangement: tuple[Arrangement, ...]) -> tuple[int, ...]:
    """Old pipelines whose unfinished requests restart from their committed tokens: their KV
    cache is neither inherited nor finished off before the deadline."""
    if current is None:
        return ()
    kept = {o for _, o in mapping.inherits} if mapping else set()
    kept |= {a.pipeline for a in arrangement if a.finishes}
    return tuple(d for d in range(current.placement.config.data)
                 if current.progress_of(d).remaining_steps > 0 and d not in kept)


def just_in_time(request: PlanRequest, migration_s: float) -> tuple[Arrangement, ...]:
    """The just-in-time arrangement of `request.current`'s pipelines on doomed instances
    (none lost, none broken): how many more decode steps each runs in the grace period
    left, given a migration of `migration_s` after it stops. `plan` uses it; so does the
    simulator's ablation that re-plans without the rest of `plan`."""
    current = request.current
    if current is None:
        return ()
    doomed = {i.name for i in request.instances if i.state == "doomed"}
    lost = {i.name for i in request.instances if i.state == "lost"}
    pipelines = {}
    for d in range(current.placement.config.data):
        where = current.placement.pipeline_instances(d)
        if where & doomed and not where & lost and d not in current.broken:
            step_s = request.decode_step_ms.get(d) or _decode_step_ms(request, current, d)
            pipelines[d] = (step_s / 1000.0, current.progress_of(d).remaining_steps)
    return arrange(request.grace_seconds, migration_s, pipelines)


def placed_stages(placement: Placement, pipeline: int, types: Mapping[str, InstanceType]
                  ) -> tuple[StageHardware, ...]:
    """The hardware of each stage of a placed pipeline, as the cost model prices it: a
    stage's tensor-parallel link is the NIC when its ranks span instances, else the
    instance's own interconnect. `types`: instance name → its type."""
    layout = placement.config.pipelines[pipeline]
    stages = []
    for s, stage in enumerate(layout.stages):
        gpus = [placement.by_position[Position(pipeline, s, r)] for r in range(stage.tp)]
        itype = types[gpus[0].instance]
        across = len({g.instance for g in gpus}) > 1
        stages.append(StageHardware(
            itype.gpu, stage.tp, stage.num_layers,
            itype.nic_bytes_per_s if across else itype.intra_node_bytes_per_s,
            itype.nic_bytes_per_s, last=s == len(layout.stages) - 1))
    return tuple(stages)


def _decode_step_ms(request: PlanRequest, current: CurrentState, pipeline: int) -> float:
    """Cost-model estimate of one decode step of a running pipeline (no micro-batching)."""
    types = {i.name: i.type for i in request.instances}
    stages = placed_stages(current.placement, pipeline, types)
    times = pipeline_times(request.cost, stages, current.placement.config.batch, 1, 1,
                           request.workload)
    return times.decode_step_ms
