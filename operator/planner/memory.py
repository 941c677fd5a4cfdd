"""Memory check: does a stage's shard plus its KV cache fit on one GPU?

Bytes come from the layout math (`position_weight_bytes`, `position_kv_bytes_per_token`),
so the planner, the loader and the tests agree on what a GPU holds. A stage fits when its
largest rank's weights plus the KV cache of `batch` sequences of `tokens` tokens stay under
`usable_fraction` of the GPU's memory (the rest is CUDA context, activations, fragmentation).
"""

from __future__ import annotations

from functools import lru_cache

from spotserve.catalog import GPUSpec
from spotserve.layout import (
    ParallelConfig,
    PipelineLayout,
    Position,
    StageLayout,
    position_kv_bytes_per_token,
    position_weight_bytes,
)
from spotserve.model_spec import ModelSpec

USABLE_FRACTION = 0.9


@lru_cache(maxsize=8192)
def stage_bytes(model: ModelSpec, tp: int, layer_start: int, layer_end: int, batch: int,
                tokens: int) -> int:
    """Largest rank's weights + KV bytes for a stage [layer_start, layer_end) at TP `tp`."""
    stages = [StageLayout(layer_start, layer_end, tp)]
    if layer_start > 0:
        stages.insert(0, StageLayout(0, layer_start, 1))
    if layer_end < model.num_layers:
        stages.append(StageLayout(layer_end, model.num_layers, 1))
    config = ParallelConfig((PipelineLayout(tuple(stages)),), batch)
    index = 1 if layer_start > 0 else 0
    return max(position_weight_bytes(model, config, Position(0, index, r))
               + position_kv_bytes_per_token(model, config, Position(0, index, r))
               * batch * tokens for r in range(tp))


def stage_fits(model: ModelSpec, gpu: GPUSpec, tp: int, layer_start: int, layer_end: int,
               batch: int, tokens: int, usable_fraction: float = USABLE_FRACTION) -> bool:
    need = stage_bytes(model, tp, layer_start, layer_end, batch, tokens)
    return need <= gpu.memory_bytes * usable_fraction


def config_fits(model: ModelSpec, gpu: GPUSpec, config: ParallelConfig, tokens: int,
                usable_fraction: float = USABLE_FRACTION) -> bool:
    """Every stage of every (distinct) pipeline fits on `gpu`."""
    stages = {s for p in config.pipelines for s in p.stages}
    return all(stage_fits(model, gpu, s.tp, s.layer_start, s.layer_end, config.batch, tokens,
                          usable_fraction) for s in stages)
