"""Cost sources: profile tables reproduce SpotServe's formula; the roofline tracks them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from spotserve.errors import SpotserveError
from spotserve.models import resolve_model
from spotserve.operator.planner import (
    Phase,
    ProfileCostModel,
    ProfileTable,
    RooflineCostModel,
    StageHardware,
    Workload,
    pipeline_times,
)
from spotserve.operator.planner.profile_table import compare_with_profile

from .support import T4X4

PAPER = {"6.7b": "megatron_6.7B_profile.json", "20b": "megatron_h6144_profile.json",
         "30b": "megatron_h7168_profile.json"}

TABLE = {"layer_num": 8, "padded_layer_num": 8, "final_fix_factor": 1.1, "pp_init_comm": 5.0,
         "pp_incr_comm": 0.1, "hidden_size": 64, "embed": [0.3, 0.4, 0.5, 0.7],
         "tp-1": {"bsz-1": {"init": 40.0, "incr": 3.0}, "bsz-2": {"init": 80.0, "incr": 3.2},
                  "bsz-4": {"init": 160.0, "incr": 3.6}},
         "tp-2": {"bsz-1": {"init": 22.0, "incr": 1.8}, "bsz-2": {"init": 44.0, "incr": 1.9},
                  "bsz-4": {"init": 90.0, "incr": 2.1}}}


def test_latency_is_spotservers_formula() -> None:
    table = ProfileTable.from_dict(TABLE)
    cost = ProfileCostModel(table)
    model = resolve_model("6.7b")
    stages = [StageHardware(T4X4.gpu, 2, n, 1e9, 1e9) for n in (3, 3, 2)]
    times = pipeline_times(cost, stages, batch=4, prefill_micro=2, decode_micro=4,
                           workload=Workload(512, 128))
    # P=3, ⌈8/3⌉=3 layers, init at micro-batch 2, incr at micro-batch 1
    t1 = 44.0 * 3 * (3 + 2 - 1) / 2 + 5.0 / 2 * 2
    t2 = 1.8 * 3 * (3 + 4 - 1) + 0.1 / 4 * 2
    latency = (t1 + 128 * t2 + 2 * 0.5) * 1.1
    assert times.latency_ms == pytest.approx(latency)
    assert times.throughput == pytest.approx(4 / latency * 1000)
    assert model.num_layers == 32  # the real model is only used for its name here


def test_unmeasured_batches_are_interpolated_and_max_tp_defaults_to_largest() -> None:
    table = ProfileTable.from_dict(TABLE)
    assert table.max_tp == 2
    assert table.layer_ms(1, 3, Phase.PREFILL) == pytest.approx(120.0)
    assert table.layer_ms(1, 8, Phase.DECODE) == pytest.approx(4.4)  # extrapolated
    assert table.embed_ms(3) == pytest.approx(0.45)
    with pytest.raises(SpotserveError, match="TP=4"):
        table.layer_ms(4, 1, Phase.DECODE)


def test_malformed_profiles_are_user_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SpotserveError, match="cannot read profile"):
        ProfileTable.load(bad)
    with pytest.raises(SpotserveError, match="no tp-N"):
        ProfileTable.from_dict({"layer_num": 4})
    with pytest.raises(SpotserveError, match="no such profile"):
        ProfileTable.load(tmp_path / "missing.json")


def roofline_errors(reference: Path) -> dict[tuple[str, str], float]:
    """Mean |roofline − measured| / measured per (model, phase) over all TP × batch cells."""
    out = {}
    for name, file in PAPER.items():
        table = ProfileTable.load(reference / "profiles" / file)
        cells = compare_with_profile(RooflineCostModel(resolve_model(name)), table, T4X4)
        for phase in Phase:
            errs = [abs(c.relative) for c in cells if c.phase is phase]
            out[(name, phase.value)] = sum(errs) / len(errs)
    return out


def test_roofline_tracks_the_t4_profiles(reference_dir: Path) -> None:
    errors = roofline_errors(reference_dir)
    assert all(e < 0.15 for e in errors.values()), errors
    assert sum(errors.values()) / len(errors) < 0.1, errors


def test_roofline_costs_any_catalog_gpu_and_prefers_faster_ones() -> None:
    model = resolve_model("llama-3.1-8b")
    roof = RooflineCostModel(model)
    from spotserve.catalog import Catalog
    catalog = Catalog.load()
    times = {}
    for gpu in ("T4", "A10G", "H100"):
        spec = catalog.gpu(gpu)
        stage = StageHardware(spec, 1, model.num_layers, 1e10, 1e10, last=True)
        times[gpu] = roof.stage_ms(stage, 1, Phase.DECODE, Workload())
    assert times["H100"] < times["A10G"] < times["T4"]
    # decode of an 8B bf16 model is bound by reading 16 GB of weights
    assert times["H100"] == pytest.approx(model.weight_bytes / 3.35e12 / 0.8 * 1000, rel=0.2)
    assert math.isfinite(roof.hop_ms(stage, 4, Phase.PREFILL, Workload()))


def test_profile_json_round_trips_from_the_reference(reference_dir: Path) -> None:
    raw = json.loads((reference_dir / "profiles" / PAPER["30b"]).read_text())
    table = ProfileTable.from_dict(raw)
    assert "max_tp" in raw and table.max_tp == 8 and table.padded_layer_num == 48
