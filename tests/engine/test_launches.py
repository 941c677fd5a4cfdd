"""What one decode step dispatches, counted as `bench/engine/launches.py` counts it: each
computing op is a kernel launch or more on a GPU, each host-built tensor an upload. The
bounds are today's counts (so a regression shows), not targets; docs/gpu.md has the
before/after figures, on CPU and on an H200."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]

# today's counts for this test's model in bf16, the dtype and code path of a GPU (fp32 on a
# CPU runs the fused projections as separate matmuls, MKL being faster so); per layer: 2
# layers' count less 1 layer's. Before the packed step, fused projections and one upload
# (681c518): 57 + 52 per layer, 8 uploads
PER_STEP, PER_LAYER = 21, 36


def _bench() -> ModuleType:
    folder = str(ROOT / "bench" / "engine")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location("launches", ROOT / "bench/engine/launches.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _bench()


@pytest.mark.parametrize("batch", [1, 8])
def test_a_decode_step_launches_a_bounded_number_of_ops(bench: ModuleType, tmp_path: Path,
                                                         batch: int) -> None:
    counts = {}
    for layers in (1, 2):
        bench.engine_bench.MODEL.update({**bench.engine_bench.SHAPES["small"],
                                         "num_hidden_layers": layers, "hidden_size": 64,
                                         "intermediate_size": 128, "num_attention_heads": 4,
                                         "num_key_value_heads": 2, "vocab_size": 256})
        folder = tmp_path / f"l{layers}"
        bench.engine_bench.save_model(folder)
        engine = bench.decode_engine(folder, batch, 20, "bfloat16", "cpu")
        counts[layers] = bench.count_step(engine, "cpu")
    per_layer = counts[2]["ops"] - counts[1]["ops"]
    per_step = counts[1]["ops"] - per_layer
    assert per_layer <= PER_LAYER, counts
    assert per_step <= PER_STEP, counts
    # every index tensor of the step travels in one upload
    assert counts[1]["host_tensors"] == counts[2]["host_tensors"] == 1, counts
