"""Memory check: does a stage's shard plus its KV cache fit on one GPU?

Bytes come from the layout math (`position_weight_bytes`, `position_kv_bytes_per_token`),
so the planner, the loader and the tests agree on what a GPU holds. A stage fits when its
largest rank's weights plus the KV cache of `batch` sequences of `tokens` tokens stay under
`usable_fraction` of the GPU's memory (the rest is CUDA context, activations, fragmentation).
The worker sizes its KV cache (`spotserve.worker.kv_sizing`) from the same two functions:
its bytes per block are the bytes per token here times the block size.
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
from spotserve.memory import USABLE_FRACTION, usable_memory_bytes
from spotserve.model_spec import ModelSpec


def stage_bytes(model: ModelSpec, tp: int, layer_start: int, layer_end: int, batch: int,
                tokens: int) -> int:
    """Largest rank's weights + KV bytes for a stage [layer_start, layer_end) at TP `tp`."""
    first, last = layer_start == 0, layer_end == model.num_layers
    terms = _per_rank_terms(model, tp, first, last)
    if terms is None:
        return _measured_bytes(model, tp, layer_start, layer_end, batch, tokens)
    n = layer_end - layer_start
    return max(per_layer * n + fixed + kv * n * batch * tokens
               for per_layer, fixed, kv in terms)


@lru_cache(maxsize=1024)
def _per_rank_terms(model: ModelSpec, tp: int, first: bool,
                    last: bool) -> tuple[tuple[int, int, int], ...] | None:
    """Per rank: (weight bytes per layer, fixed bytes of embeddings/head, KV bytes per layer
    and token), read off the layout math at 1 and 2 layers. None when the model is too
    shallow to place such a stage at both sizes."""
    lo = 0 if first else 1
    if (first and last) or lo + 2 + (0 if last else 1) > model.num_layers:
        return None
    hi = model.num_layers if last else lo + 2
    out = []
    for r in range(tp):
        one = _position_bytes(model, tp, hi - 1 if last else lo, hi if last else lo + 1, r)
        two = _position_bytes(model, tp, hi - 2 if last else lo, hi, r)
        out.append((two[0] - one[0], 2 * one[0] - two[0], one[1]))
    return tuple(out)


def _layout(model: ModelSpec, tp: int, layer_start: int, layer_end: int,
            batch: int = 1) -> tuple[ParallelConfig, int]:
    stages = [StageLayout(layer_start, layer_end, tp)]
    if layer_start > 0:
        stages.insert(0, StageLayout(0, layer_start, 1))
    if layer_end < model.num_layers:
        stages.append(StageLayout(layer_end, model.num_layers, 1))
    return ParallelConfig((PipelineLayout(tuple(stages)),), batch), 1 if layer_start > 0 else 0


def _position_bytes(model: ModelSpec, tp: int, layer_start: int, layer_end: int,
                    rank: int) -> tuple[int, int]:
    config, index = _layout(model, tp, layer_start, layer_end)
    pos = Position(0, index, rank)
    return (position_weight_bytes(model, config, pos),
            position_kv_bytes_per_token(model, config, pos))


@lru_cache(maxsize=4096)
def _measured_bytes(model: ModelSpec, tp: int, layer_start: int, layer_end: int, batch: int,
                    tokens: int) -> int:
    """The same figure straight from the layout math, for shallow models."""
    return max(w + kv * batch * tokens for w, kv in
               (_position_bytes(model, tp, layer_start, layer_end, r) for r in range(tp)))


def stage_fits(model: ModelSpec, gpu: GPUSpec, tp: int, layer_start: int, layer_end: int,
               batch: int, tokens: int, usable_fraction: float = USABLE_FRACTION) -> bool:
    need = stage_bytes(model, tp, layer_start, layer_end, batch, tokens)
    return need <= usable_memory_bytes(gpu, usable_fraction)


def config_fits(model: ModelSpec, gpu: GPUSpec, config: ParallelConfig, tokens: int,
                usable_fraction: float = USABLE_FRACTION) -> bool:
    """Every stage of every (distinct) pipeline fits on `gpu`."""
    stages = {s for p in config.pipelines for s in p.stages}
    return all(stage_fits(model, gpu, s.tp, s.layer_start, s.layer_end, config.batch, tokens,
                          usable_fraction) for s in stages)
