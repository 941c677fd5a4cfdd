"""A `Plan` as JSON-ready data and as a readable summary.

The `pipelines` list has the same shape `current:` takes in a plan input, so a plan's
output can be fed back as the next plan's running placement.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from spotserve.layout import ParallelConfig

from .cluster import Placement

if TYPE_CHECKING:
    from .planner import Plan

GB = 1e9


def _pipelines(config: ParallelConfig, placement: Placement | None,
               weights: tuple[float, ...]) -> list[dict[str, Any]]:
    gpus = placement.by_position if placement else {}
    out = []
    for d, pipe in enumerate(config.pipelines):
        stages = []
        for s, stage in enumerate(pipe.stages):
            entry: dict[str, Any] = {"layers": [stage.layer_start, stage.layer_end],
                                     "tp": stage.tp}
            if stage.gpu_type:
                entry["gpu_type"] = stage.gpu_type
            if gpus:
                entry["gpus"] = [str(gpus[p]) for p in config.positions()
                                 if p.pipeline == d and p.stage == s]
            stages.append(entry)
        out.append({"stages": stages, "weight": round(weights[d], 6) if weights else None})
    return out


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    cfg = plan.config
    out: dict[str, Any] = {
        "strategy": plan.strategy, "cost_model": plan.cost_model,
        "config": None if cfg is None else {
            "D": cfg.data, "P": cfg.pipeline_degree, "M": cfg.tensor_degree, "B": cfg.batch,
            "M1": plan.prefill_micro, "M2": plan.decode_micro, "uniform": cfg.is_uniform},
        "latency_s": None if math.isinf(plan.latency_ms) else round(plan.latency_ms / 1000, 4),
        "throughput": round(plan.throughput, 4), "rate": plan.rate,
        "meets_rate": plan.meets_rate, "cost_per_hour": round(plan.cost_per_hour, 4),
        "extra": {"instances": plan.extra_instances, "type": plan.extra_instance_type,
                  "capacity": plan.extra_capacity},
        "pipelines": [] if cfg is None else _pipelines(
            cfg, plan.mapping.placement if plan.mapping else None, plan.pipeline_weights),
        "idle_instances": list(plan.idle_instances),
        "requeued_pipelines": list(plan.requeued_pipelines),
    }
    m = plan.mapping
    out["mapping"] = None if m is None else {
        "positions": {str(p): str(g) for p, g in m.placement.assignment},
        "inherits": [{"new_pipeline": n, "old_pipeline": o} for n, o in m.inherits],
        "reused_weight_bytes": m.reused_weight_bytes, "reused_kv_bytes": m.reused_kv_bytes,
        "fast_path": m.fast_path}
    mig = plan.migration
    out["transfers"] = [] if mig is None else [
        {"kind": t.kind, "src": None if t.src is None else str(t.src), "dst": str(t.dst),
         "tensor": t.tensor, "dim": t.dim, "start": t.start, "stop": t.stop, "layer": t.layer,
         "bytes": t.nbytes, "urgent": t.urgent,
         **({"old_pipeline": t.kv_pipeline} if t.kv_pipeline is not None else {})}
        for t in mig.transfers]
    out["migration_seconds"] = None if mig is None else round(mig.seconds, 3)
    out["migration_peak_gpu_bytes"] = None if mig is None else mig.peak_gpu_bytes
    out["migration_peak_over_footprint_bytes"] = (None if mig is None
                                                  else mig.peak_over_footprint_bytes)
    out["arrangement"] = [{"pipeline": a.pipeline, "steps": a.steps,
                           "remaining_steps": a.remaining_steps, "action": a.action,
                           "stop_after_s": round(a.stop_after_s, 3), "overruns": a.overruns}
                          for a in plan.arrangement]
    return out


def plan_summary(plan: Plan) -> str:
    cfg = plan.config
    if cfg is None:
        lines = ["no configuration fits the usable instances"]
    else:
        micro = f" M1={plan.prefill_micro} M2={plan.decode_micro}"
        lines = [f"{plan.strategy} ({plan.cost_model}): {cfg.describe()}{micro}",
                 f"  latency {plan.latency_ms / 1000:.2f} s/request, throughput "
                 f"{plan.throughput:.3f} req/s (required {plan.rate:g}), "
                 f"${plan.cost_per_hour:.2f}/h"]
    if not plan.meets_rate and plan.rate > 0:
        lines.append(f"  short of the rate: {plan.extra_instances} more "
                     f"{plan.extra_capacity} {plan.extra_instance_type} instance(s) would "
                     f"reach it" if plan.extra_instances else "  the rate is out of reach")
    if plan.idle_instances:
        lines.append(f"  idle: {', '.join(plan.idle_instances)}")
    if cfg is not None and plan.mapping is not None:
        for line in _pipelines(cfg, plan.mapping.placement, plan.pipeline_weights)[:8]:
            stages = " → ".join(f"[{s['layers'][0]}:{s['layers'][1]}] "
                                f"{','.join(s['gpus'])}" for s in line["stages"])
            lines.append(f"  pipeline: {stages}")
        if cfg.data > 8:
            lines.append(f"  … {cfg.data - 8} more pipelines")
    if plan.migration is not None and plan.mapping is not None:
        mig, m = plan.migration, plan.mapping
        lines.append(f"  migration: {len(mig.transfers)} transfers, {mig.total_bytes / GB:.2f}"
                     f" GB ({mig.urgent_bytes / GB:.2f} GB urgent), ~{mig.seconds:.1f} s; "
                     f"reused {m.reused_bytes / GB:.2f} GB in place")
        lines.append(f"  migration memory: peak {mig.peak_gpu_bytes / GB:.2f} GB/GPU, "
                     f"{mig.peak_over_footprint_bytes / GB:.2f} GB above the larger footprint")
    for a in plan.arrangement:
        lines.append(f"  pipeline {a.pipeline} (doomed): {a.action}")
    if plan.requeued_pipelines:
        lines.append(f"  requeued (re-prefill): pipelines "
                     f"{', '.join(map(str, plan.requeued_pipelines))}")
    return "\n".join(lines)
