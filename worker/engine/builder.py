"""Assemble a rank's runner (stage model + KV cache) for a configuration epoch, and the
driver's engine on top of it."""

from __future__ import annotations

from pathlib import Path

import torch

from spotserve.layout import ParallelConfig
from spotserve.worker.engine.engine import Engine, EngineConfig
from spotserve.worker.engine.kv_cache import KVCache
from spotserve.worker.engine.runner import StageRunner
from spotserve.worker.model.loader import load_stage
from spotserve.worker.model.parallel import EpochGroups


def build_runner(folder: str | Path, groups: EpochGroups, config: EngineConfig, *,
                 dtype: str | None = None, device: torch.device | str = "cpu") -> StageRunner:
    """Load this rank's slice of the checkpoint and allocate its KV cache."""
    assert groups.position is not None, "this process has no position in the epoch"
    model = load_stage(folder, groups.config, groups.position, dtype=dtype, tp=groups.tp,
                       device=device)
    cache = KVCache.for_stage(model, config.num_blocks, config.block_size)
    return StageRunner(model, cache, groups)


def local_engine(folder: str | Path, config: EngineConfig | None = None, *,
                 dtype: str | None = None, device: torch.device | str = "cpu") -> Engine:
    """A one-process engine holding the whole model."""
    from spotserve.model_spec import ModelSpec
    config = config or EngineConfig()
    spec = ModelSpec.from_hf_config(Path(folder))
    groups = EpochGroups.single(ParallelConfig.uniform(spec.num_layers, 1, 1, 1))
    return Engine(build_runner(folder, groups, config, dtype=dtype, device=device), config)
