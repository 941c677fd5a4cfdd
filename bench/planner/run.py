"""Planner benchmark: planning time at scale, and what Kuhn–Munkres mapping saves.

    python bench/planner/run.py [--repeat 3] [--out bench/results/planner.json]

Homogeneous pools of 16, 64 and 128 instances with 4 and 8 GPUs each (L4 instances,
Llama 3.1 70B in bf16, roofline costs) are planned twice: a cold start, then a preemption
(two instances doomed, one joining) re-planned from the running placement. The timed call
is the whole `plan()`: search, device mapping, migration plan and arrangement. The same
preemption is also planned with a baseline that ignores the running placement (positions
laid out in instance order, the plan a reconfiguration without matching would make), to
show what the matching keeps in place. A 30-instance pool of three GPU types exercises the
heterogeneous search. Targets: < 1 s for 128×8 homogeneous, < 5 s heterogeneous.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from spotserve.catalog import Catalog
from spotserve.models import resolve_model
from spotserve.operator.planner import (
    CurrentState,
    Instance,
    PipelineProgress,
    PlanRequest,
    RooflineCostModel,
    SearchLimits,
    map_devices,
    migration_plan,
    plan,
)

ROOT = Path(__file__).resolve().parents[2]
MODEL = "llama-3.1-70b"
TYPES = {4: "g6.12xlarge", 8: "g6.48xlarge"}
HETERO = ("g5.12xlarge", "g6.12xlarge", "g6e.12xlarge")
HOMOGENEOUS_TARGET_S, HETERO_TARGET_S = 1.0, 5.0
GB = 1e9


def timed(fn: Any, repeat: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def request(instances: list[Instance], current: CurrentState | None = None) -> PlanRequest:
    model = resolve_model(MODEL)
    return PlanRequest(model=model, instances=tuple(instances), cost=RooflineCostModel(model),
                       rate=0.5 * len(instances), limits=SearchLimits(max_batch=8),
                       current=current)


def homogeneous_case(count: int, gpus: int, repeat: int) -> dict[str, Any]:
    itype = Catalog.load().instance(TYPES[gpus])
    pool = [Instance(f"n{i:03d}", itype, spot_price=itype.price / 2) for i in range(count)]
    cold_s, cold = timed(lambda: plan(request(pool)), repeat)
    assert cold.mapping is not None and cold.config is not None
    progress = tuple(PipelineProgress(d, 4 * 600, 60) for d in range(cold.config.data))
    current = CurrentState(cold.mapping.placement, progress)
    doomed = {pool[1].name, pool[count // 2].name}
    after = [replace(i, state="doomed") if i.name in doomed else i for i in pool]
    after.append(Instance("joiner", itype, state="joining", spot_price=itype.price / 2))
    req = request(after, current)
    replan_s, replan = timed(lambda: plan(req), repeat)
    assert replan.mapping is not None and replan.migration is not None
    assert replan.config is not None
    naive = map_devices(req.model, replan.config, after)  # instance order, no matching
    naive_migration = migration_plan(req.model, current, naive.placement, replan.mapping.inherits,
                                     after)
    km_moved, naive_moved = replan.migration.total_bytes, naive_migration.total_bytes
    return {
        "instances": count, "gpus_per_instance": gpus, "instance_type": itype.name,
        "config": replan.config.describe(), "cold_plan_s": round(cold_s, 4),
        "replan_s": round(replan_s, 4), "target_s": HOMOGENEOUS_TARGET_S,
        "replan_vs_target": round(replan_s / HOMOGENEOUS_TARGET_S, 3),
        "transfers": len(replan.migration.transfers),
        "km_moved_gb": round(km_moved / GB, 2), "baseline_moved_gb": round(naive_moved / GB, 2),
        "km_migration_s": round(replan.migration.seconds, 2),
        "baseline_migration_s": round(naive_migration.seconds, 2),
    }


def hetero_case(repeat: int) -> dict[str, Any]:
    catalog = Catalog.load()
    pool = [Instance(f"{name.split('.')[0]}-{i}", catalog.instance(name),
                     spot_price=catalog.instance(name).price / 2)
            for name in HETERO for i in range(10)]
    seconds, result = timed(lambda: plan(replace(request(pool), rate=3.0)), repeat)
    assert result.config is not None
    return {"instances": len(pool), "types": list(HETERO), "config": result.config.describe(),
            "pipelines": result.config.data, "throughput": round(result.throughput, 3),
            "plan_s": round(seconds, 4), "target_s": HETERO_TARGET_S,
            "plan_vs_target": round(seconds / HETERO_TARGET_S, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (best is kept)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "planner.json")
    args = parser.parse_args()
    rows = [homogeneous_case(n, g, args.repeat) for g in (4, 8) for n in (16, 64, 128)]
    header = (f"{'pool':>9} {'config (after preemption)':<26} {'cold s':>7} {'replan s':>8} "
              f"{'/target':>7} {'KM GB':>7} {'base GB':>8} {'KM mig s':>8} {'base mig s':>10}")
    print(f"homogeneous: {MODEL} bf16, roofline, 2 doomed + 1 joining")
    print(header)
    for r in rows:
        print(f"{r['instances']:>5}x{r['gpus_per_instance']:<3} {r['config']:<26} "
              f"{r['cold_plan_s']:>7.3f} {r['replan_s']:>8.3f} {r['replan_vs_target']:>7.2f} "
              f"{r['km_moved_gb']:>7.1f} {r['baseline_moved_gb']:>8.1f} "
              f"{r['km_migration_s']:>8.1f} {r['baseline_migration_s']:>10.1f}")
    het = hetero_case(args.repeat)
    print(f"\nheterogeneous: {het['instances']} instances of {', '.join(het['types'])}")
    print(f"  {het['config']}")
    print(f"  plan {het['plan_s']:.3f} s ({het['plan_vs_target']:.2f} of the {HETERO_TARGET_S:g} s "
          f"target), {het['pipelines']} pipelines, {het['throughput']} req/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bench": "planner", "machine": platform.node(),
                                    "python": platform.python_version(),
                                    "homogeneous": rows, "heterogeneous": het}, indent=1))
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
