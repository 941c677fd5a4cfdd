"""Planner: cost model, configuration search, device mapping, migration plan, arrangement.

Pure Python + numpy/scipy, no I/O beyond reading the inputs it is pointed at; the operator,
the local controller and the simulator all call it the same way.

One call does everything::

    from spotserve.operator.planner import load_request, plan
    result = plan(load_request("examples/plan/preemption.yaml"))   # -> Plan
    result.config, result.mapping.placement, result.migration.transfers, result.arrangement
    result.to_dict()   # what `spotserve plan --json` prints

or build `PlanRequest(model, instances, cost, rate=..., current=...)` directly.

The pieces, one module each, usable on their own:

- `cost_model`: `CostModel` protocol (`stage_ms`, `hop_ms`, `overhead_ms`, `supports`,
  `fix_factor`), `StageHardware`, `Workload`, and `pipeline_times(cost, stages, B, M1, M2,
  workload) -> StepTimes(prefill_ms, decode_step_ms, latency_ms, throughput)`: SpotServe's
  latency formula, shared by every search.
- `profile_table`: `ProfileTable.load(json)` (SpotServe artifact format, interpolated
  batches) and `ProfileCostModel(table, gpu_name)`.
- `roofline`: `RooflineCostModel(model)` for any `ModelSpec` × catalog GPU.
- `memory`: `stage_fits`, `config_fits` (weights + KV for B sequences ≤ usable memory).
- `homogeneous`: `search(model, cost, instance_type, prices, workload, rate, SearchLimits)
  -> HomogeneousResult(best: Candidate, meets_rate, extra_instances)`; `pipeline_shapes`
  and `choose` for callers (the simulator) that ask "what with N instances" many times.
- `heterogeneous`: `search(model, cost, instances, workload, rate, HeteroLimits)
  -> HeteroResult` (pipelines of per-instance stages with uneven layer ranges, weights).
- `cluster`: `Instance`, `GpuId`, `Placement`, `PipelineProgress`, `CurrentState`.
- `device_mapper`: `map_devices(model, new_config, instances, current) -> MappingResult`
  (placement, KV inheritance, reused bytes; two-level Kuhn–Munkres).
- `migration`: `migration_plan(model, current, placement, inherits, instances)
  -> MigrationPlan(transfers, seconds, ...)`.
- `arrangement`: `arrange(deadline_s, migration_s, {pipeline: (step_s, steps_left)})
  -> (Arrangement, ...)`, and `decode_steps` for one pipeline.
- `request`: `PlanRequest`, `parse_request(dict)`, `load_request(path)`.
- `planner`: `plan(PlanRequest) -> Plan`; its parts `just_in_time(request, migration_s)`
  (the arrangement) and `placed_stages(placement, pipeline, types)` (a placed pipeline's
  hardware, as the cost model prices it); `render`: `Plan.to_dict()`, `Plan.summary()`.
- `cli`: `spotserve plan`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> submodule. Loaded on first use, so `spotserve plan --help` (which imports
# `spotserve.operator.planner.cli`, hence this package) does not pay for numpy and scipy.
_EXPORTS = {
    "Arrangement": "arrangement", "arrange": "arrangement", "decode_steps": "arrangement",
    "CurrentState": "cluster", "GpuId": "cluster", "Instance": "cluster",
    "PipelineProgress": "cluster", "Placement": "cluster",
    "CostModel": "cost_model", "Phase": "cost_model", "StageHardware": "cost_model",
    "StepTimes": "cost_model", "Workload": "cost_model", "pipeline_times": "cost_model",
    "MappingResult": "device_mapper", "map_devices": "device_mapper",
    "HeteroLimits": "heterogeneous", "HeteroResult": "heterogeneous",
    "Candidate": "homogeneous", "HomogeneousResult": "homogeneous",
    "SearchLimits": "homogeneous",
    "MigrationPlan": "migration", "Transfer": "migration", "migration_plan": "migration",
    "Plan": "planner", "plan": "planner", "just_in_time": "planner",
    "placed_stages": "planner",
    "ProfileCostModel": "profile_table", "ProfileTable": "profile_table",
    "PlanRequest": "request", "load_request": "request", "parse_request": "request",
    "RooflineCostModel": "roofline",
}

if TYPE_CHECKING:
    from .arrangement import Arrangement, arrange, decode_steps
    from .cluster import CurrentState, GpuId, Instance, PipelineProgress, Placement
    from .cost_model import (
        CostModel,
        Phase,
        StageHardware,
        StepTimes,
        Workload,
        pipeline_times,
    )
    from .device_mapper import MappingResult, map_devices
    from .heterogeneous import HeteroLimits, HeteroResult
    from .homogeneous import Candidate, HomogeneousResult, SearchLimits
    from .migration import MigrationPlan, Transfer, migration_plan
    from .planner import Plan, just_in_time, placed_stages, plan
    from .profile_table import ProfileCostModel, ProfileTable
    from .request import PlanRequest, load_request, parse_request
    from .roofline import RooflineCostModel


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "Arrangement", "Candidate", "CostModel", "CurrentState", "GpuId", "HeteroLimits",
    "HeteroResult", "HomogeneousResult", "Instance", "MappingResult", "MigrationPlan", "Phase",
    "PipelineProgress", "Placement", "Plan", "PlanRequest", "ProfileCostModel", "ProfileTable",
    "RooflineCostModel", "SearchLimits", "StageHardware", "StepTimes", "Transfer", "Workload",
    "arrange", "decode_steps", "just_in_time", "load_request", "map_devices", "migration_plan",
    "parse_request", "pipeline_times", "placed_stages", "plan",
]
