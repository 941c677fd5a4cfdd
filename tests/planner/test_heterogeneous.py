"""Heterogeneous search: the dynamic program finds the exhaustive optimum on small pools."""

from __future__ import annotations

import itertools

import pytest

from spotserve.operator.planner import HeteroLimits, Workload
from spotserve.operator.planner.cost_model import StageHardware, pipeline_times
from spotserve.operator.planner.heterogeneous import search
from spotserve.operator.planner.memory import stage_fits
from spotserve.operator.planner.roofline import RooflineCostModel

from .support import pool, small_type, tiny_model

WORK = Workload(64, 16)
# memory so small that a stage holds only a few of the tiny model's layers
FAST = small_type("fast", 2, memory_gib=0.0001, tflops=20.0, price=3.0)
SLOW = small_type("slow", 1, memory_gib=0.00013, tflops=4.0, price=1.0)


def score(model, cost, types, stages, limits):  # type: ignore[no-untyped-def]
    hw = [StageHardware(types[t].gpu, types[t].gpus, b - a, types[t].intra_node_bytes_per_s,
                        types[t].nic_bytes_per_s, last=b == model.num_layers)
          for t, a, b in stages]
    times = pipeline_times(cost, hw, 1, 1, 1, WORK)
    price = sum(types[t].price for t, _, _ in stages)
    value = times.throughput / price
    slo = limits.latency_slo_ms
    if slo is not None and times.latency_ms > slo:
        value *= (slo / times.latency_ms) ** 2
    return value


def exhaustive(model, cost, counts, limits):  # type: ignore[no-untyped-def]
    types = {"fast": FAST, "slow": SLOW}
    best = 0.0
    L = model.num_layers
    for n in range(1, sum(counts.values()) + 1):
        for seq in itertools.product(types, repeat=n):
            if any(seq.count(t) > c for t, c in counts.items()):
                continue
            for cuts in itertools.combinations(range(1, L), n - 1):
                bounds = [0, *cuts, L]
                stages = [(t, a, b) for t, a, b in zip(seq, bounds, bounds[1:], strict=False)]
                if all(stage_fits(model, types[t].gpu, types[t].gpus, a, b, 1,
                                  WORK.total_tokens) for t, a, b in stages):
                    best = max(best, score(model, cost, types, stages, limits))
    return best


@pytest.mark.parametrize("counts,slo", [({"fast": 2, "slow": 2}, None),
                                        ({"fast": 1, "slow": 3}, None),
                                        ({"fast": 2, "slow": 2}, 5.0),
                                        ({"fast": 3, "slow": 1}, 2.0)])
def test_dynamic_program_matches_exhaustive_search(counts, slo) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model(6)
    cost = RooflineCostModel(model)
    limits = HeteroLimits(max_batch=1, latency_slo_ms=slo)
    instances = pool(FAST, counts["fast"], "f") + pool(SLOW, counts["slow"], "s")
    result = search(model, cost, instances, WORK, 1e-9, limits)
    assert result is not None
    expected = exhaustive(model, cost, counts, limits)
    assert expected > 0
    assert result.pipelines[0].score == pytest.approx(expected)


def test_replicas_fill_the_pool_with_weights_by_throughput() -> None:
    model = tiny_model(6)
    instances = pool(FAST, 2, "f") + pool(SLOW, 3, "s")
    result = search(model, RooflineCostModel(model), instances, WORK, 0.0,
                    HeteroLimits(max_batch=2))
    assert result is not None and len(result.pipelines) >= 2
    used = [s.instance_type for p in result.pipelines for s in p.stages]
    assert used.count("fast") <= 2 and used.count("slow") <= 3
    assert sum(result.weights) == pytest.approx(1.0)
    for weight, pipe in zip(result.weights, result.pipelines, strict=True):
        assert weight == pytest.approx(pipe.throughput / result.throughput)
    config = result.config({"fast": FAST, "slow": SLOW})
    for pipe in config.pipelines:
        for stage in pipe.stages:
            assert stage.tp == (2 if stage.gpu_type == "fast-gpu" else 1)
    config.validate(model)


def test_plan_places_each_stage_on_one_instance_of_its_gpu_type() -> None:
    from spotserve.operator.planner import PlanRequest, plan

    model = tiny_model(6)
    instances = pool(FAST, 2, "f") + pool(SLOW, 3, "s")
    result = plan(PlanRequest(model, tuple(instances), RooflineCostModel(model), rate=0.0,
                              workload=WORK, hetero=HeteroLimits(max_batch=1)))
    assert result.strategy == "heterogeneous" and result.config is not None
    assert result.mapping is not None
    by_name = {i.name: i for i in instances}
    placement = result.mapping.placement
    for d, pipe in enumerate(result.config.pipelines):
        for s, stage in enumerate(pipe.stages):
            homes = {g.instance for p, g in placement.assignment
                     if (p.pipeline, p.stage) == (d, s)}
            assert len(homes) == 1
            assert by_name[homes.pop()].type.gpu.name == stage.gpu_type
