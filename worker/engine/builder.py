"""Assemble a rank's runner (stage model + KV cache) for a configuration epoch, and the
driver's engine on top of it.

What the worker service does at each epoch, in order:

    epoch = open_epoch(folder, n, config, ranks, engine_config)    # collective, all ranks
    if epoch.engine is None: epoch.runner.serve_forever()          # followers
    else: ... epoch.engine.submit / step / drain / publish / adopt ... ; epoch.engine.shutdown()
    epoch.close()                                                  # before the next epoch

Weights come from the checkpoint folder, or (after a migration) from `tensors` already
pulled from peers: name → this position's slice, as `position_slices` lists them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from spotserve.layout import ParallelConfig, Position, TensorSlice
from spotserve.worker.engine.engine import Engine, EngineConfig
from spotserve.worker.engine.graphs import DecodeGraphs
from spotserve.worker.engine.kv_cache import KVCache
from spotserve.worker.engine.kv_shares import KVShares
from spotserve.worker.engine.runner import StageRunner
from spotserve.worker.model.decoder import TORCH_DTYPES, StageModel
from spotserve.worker.model.loader import copy_on_device, iter_slices, load_into, load_stage
from spotserve.worker.model.parallel import EpochGroups


def build_runner(folder: str | Path, groups: EpochGroups, config: EngineConfig, *,
                 dtype: str | None = None, device: torch.device | str = "cpu",
                 tensors: dict[str, torch.Tensor] | None = None,
                 shares: KVShares | None = None, reuse: StageModel | None = None,
                 on_device: Sequence[tuple[TensorSlice, TensorSlice]] = ()) -> StageRunner:
    """Load this rank's slice and allocate its KV cache. Weights are taken over from
    `reuse` (this worker's previous stage of the same checkpoint) where it holds them
    unchanged, else taken from `tensors` (gathered from memory and peers), else read from
    the checkpoint; then the `on_device` pieces (the gather's `stats.on_device`) are
    copied from `reuse`'s tensors, device to device. `shares` is the worker's store of
    paused requests' KV (kept across epochs)."""
    assert groups.position is not None, "this process has no position in the epoch"
    if tensors is None:
        model = load_stage(folder, groups.config, groups.position, dtype=dtype, tp=groups.tp,
                           device=device, reuse=reuse)
    else:
        from spotserve.model_spec import ModelSpec
        spec = ModelSpec.from_hf_config(Path(folder), dtype=dtype)
        # what the device copies need, held past the old stage's giving up
        held = {}
        if reuse is not None and on_device:
            params, wanted = dict(reuse.named_parameters()), {p.tensor for _, p in on_device}
            held = {s.tensor: (s, params[s.tensor]) for s in reuse.slices
                    if s.tensor in wanted}
        model = StageModel(spec, groups.config, groups.position, groups.tp, device, reuse)
        absent = tuple(s for s in model.slices
                       if s.tensor not in tensors and s.tensor not in model.reused)
        load_into(model, itertools.chain(tensors.items(), iter_slices(
            Path(folder), absent, TORCH_DTYPES[spec.dtype], pin=model.device.type == "cuda")))
        copy_on_device(model, on_device, held)
        held.clear()
    if not (config.cuda_graphs and DecodeGraphs.usable(model)):
        cache = KVCache.for_stage(model, config.num_blocks, config.block_size)
        return StageRunner(model, cache, groups, shares)
    # one block more than the engine hands out: where the graphs' padding writes
    cache = KVCache.for_stage(model, config.num_blocks + 1, config.block_size)
    limits = config.scheduler
    graphs = DecodeGraphs(model, cache, config.num_blocks, limits.max_num_seqs,
                          -(-min(limits.max_model_len, model.spec.max_position)
                            // config.block_size))
    return StageRunner(model, cache, groups, shares, graphs)


@dataclass
class Epoch:
    """One process's part in a configuration epoch."""

    groups: EpochGroups
    runner: StageRunner | None = None   # None: this process sits the epoch out
    engine: Engine | None = None        # on the pipeline driver only

    def close(self) -> None:
        self.groups.destroy()


def open_epoch(folder: str | Path, epoch: int, config: ParallelConfig,
               ranks: dict[Position, int], engine_config: EngineConfig, *,
               dtype: str | None = None, device: torch.device | str = "cpu",
               tensors: dict[str, torch.Tensor] | None = None) -> Epoch:
    """Collective over the world: regroup, then load and allocate this rank's share."""
    groups = EpochGroups.create(epoch, config, ranks)
    if groups.position is None:
        return Epoch(groups)
    runner = build_runner(folder, groups, engine_config, dtype=dtype, device=device,
                          tensors=tensors)
    engine = Engine(runner, engine_config) if groups.is_driver else None
    return Epoch(groups, runner, engine)


def local_engine(folder: str | Path, config: EngineConfig | None = None, *,
                 dtype: str | None = None, device: torch.device | str = "cpu") -> Engine:
    """A one-process engine holding the whole model."""
    from spotserve.model_spec import ModelSpec
    config = config or EngineConfig()
    spec = ModelSpec.from_hf_config(Path(folder))
    groups = EpochGroups.single(ParallelConfig.uniform(spec.num_layers, 1, 1, 1))
    return Engine(build_runner(folder, groups, config, dtype=dtype, device=device), config)
