"""Homogeneous search: SpotServe's choices on the paper's setup, and the search's rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotserve.models import resolve_model
from spotserve.operator.planner import ProfileCostModel, ProfileTable, SearchLimits, Workload
from spotserve.operator.planner.homogeneous import search
from spotserve.operator.planner.roofline import RooflineCostModel

from .support import CATALOG, T4X4

# model: (profile, min GPUs per replica, α)
PAPER = {"6.7b": ("megatron_6.7B_profile.json", 4, 2.0),
         "20b": ("megatron_h6144_profile.json", 12, 0.4),
         "30b": ("megatron_h7168_profile.json", 16, 0.2)}

# What the SpotServe artifact's StrategyOptimizer.solve returns for 4×T4 instances
# (4·N GPUs), batch ≤ 4: (D, M, P, B, M1, M2), or None when no replica fits.
SPOTSERVE = {
    "6.7b": {3: (3, 4, 1, 4, 4, 1), 4: (4, 4, 1, 4, 4, 1), 5: (5, 4, 1, 2, 2, 1),
             6: (6, 4, 1, 2, 2, 1), 7: (7, 4, 1, 2, 2, 1), 8: (8, 4, 1, 2, 2, 1),
             9: (9, 4, 1, 2, 2, 1), 10: (5, 4, 2, 2, 2, 1)},
    "20b": {3: (1, 4, 3, 4, 4, 1), 4: (1, 8, 2, 4, 4, 1), 5: (1, 8, 2, 4, 4, 1),
            6: (2, 4, 3, 4, 4, 1), 7: (2, 4, 3, 4, 4, 1), 8: (2, 8, 2, 4, 4, 1),
            9: (2, 8, 2, 4, 4, 1), 10: (2, 8, 2, 4, 4, 1)},
    "30b": {3: None, 4: (1, 8, 2, 4, 4, 1), 5: (1, 8, 2, 4, 4, 1), 6: (1, 8, 3, 4, 4, 1),
            7: (1, 8, 3, 4, 4, 1), 8: (1, 8, 4, 4, 4, 1), 9: (1, 8, 4, 4, 4, 1),
            10: (1, 8, 4, 4, 4, 1)},
}


def paper_search(reference: Path, name: str, instances: int, fill: bool = True):  # type: ignore[no-untyped-def]
    profile, min_gpus, rate = PAPER[name]
    table = ProfileTable.load(reference / "profiles" / profile)
    limits = SearchLimits(max_batch=4, min_gpus_per_replica=min_gpus, max_tp=table.max_tp,
                          pipeline_divides=table.padded_layer_num, fill=fill)
    return search(resolve_model(name), ProfileCostModel(table), T4X4, [1.9046] * instances,
                  Workload(512, 128), rate, limits)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_reproduces_spotservers_configuration_at_3_to_10_instances(
        reference_dir: Path, name: str) -> None:
    for instances, expected in SPOTSERVE[name].items():
        result = paper_search(reference_dir, name, instances)
        best = result.best
        got = None if best is None else (best.data, best.shape.tensor, best.shape.pipeline,
                                         best.shape.batch, best.shape.prefill_micro,
                                         best.shape.decode_micro)
        assert got == expected, (name, instances)


def test_short_of_the_rate_says_how_many_more_instances(reference_dir: Path) -> None:
    result = paper_search(reference_dir, "20b", 4)
    assert not result.meets_rate and result.best is not None
    assert result.best.throughput < 0.4
    assert result.extra_instances == 2
    assert paper_search(reference_dir, "20b", 4 + 2).meets_rate
    none = paper_search(reference_dir, "30b", 3)
    assert none.best is None and none.extra_instances == 1


def test_fewest_instances_mode_keeps_latency_and_frees_instances(reference_dir: Path) -> None:
    full = paper_search(reference_dir, "6.7b", 9)
    lean = paper_search(reference_dir, "6.7b", 9, fill=False)
    assert full.best is not None and lean.best is not None
    assert lean.best.latency_ms == full.best.latency_ms
    assert lean.best.instances < full.best.instances == 9
    assert lean.best.throughput >= 2.0 > (lean.best.data - 1) * lean.best.shape.times.throughput


def test_tp_groups_pack_instances_and_respect_the_switch() -> None:
    model = resolve_model("llama-3.1-70b")
    itype = CATALOG.instance("g6e.12xlarge")  # 4×L40S
    cost = RooflineCostModel(model)
    for across in (True, False):
        limits = SearchLimits(max_batch=4, tp_across_instances=across)
        best = search(model, cost, itype, [10.0] * 6, Workload(), 0.5, limits).best
        assert best is not None
        m = best.shape.tensor
        assert itype.gpus % m == 0 or (across and m % itype.gpus == 0)


def test_models_too_big_for_the_pool_get_no_configuration() -> None:
    model = resolve_model("llama-3.1-70b")
    itype = CATALOG.instance("g4dn.xlarge")  # one 16 GB T4
    result = search(model, RooflineCostModel(model), itype, [0.5] * 4, Workload(), 1.0,
                    SearchLimits())
    assert result.best is None and not result.meets_rate and result.extra_instances > 0
