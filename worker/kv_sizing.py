"""How many KV-cache blocks a worker allocates for one configuration (`--kv-blocks`).

The KV cache is allocated per configuration epoch, for the shard the worker holds in it
(its stage's layers, its KV heads), so its size is worked out at each Configure:

- `--kv-blocks N`: N blocks, whatever the shard;
- `--kv-blocks auto` (the default) with `--kv-memory-gib G`: G GiB of KV cache, on any device;
- `--kv-blocks auto` on a CUDA device, as vLLM's `gpu_memory_utilization` does:
  floor((total GPU memory x `--gpu-memory-utilization` - this shard's weight bytes - a step's
  activation/workspace reserve) / KV bytes per block of this shard);
- `--kv-blocks auto` on CPU: `CPU_DEFAULT_BLOCKS`.

Bytes come from the shared memory math (`spotserve.memory`, over the layout math), the
same figures the planner's memory check uses. An automatic size is never below one
max-length sequence (`--max-model-len` x the block size): it is raised to that when the
GPU can still hold it, and the Configure fails with `KVCacheTooSmall`, naming the numbers,
when it cannot (rather than running out of memory later). The ranks of a pipeline then
agree on the smallest size among them (`EpochGroups.min_int`), since the driver's block
tables address every rank's cache.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spotserve.errors import SpotserveError
from spotserve.layout import ParallelConfig, Position, position_weight_bytes
from spotserve.memory import USABLE_FRACTION, kv_bytes_per_block, step_reserve_bytes
from spotserve.model_spec import ModelSpec

if TYPE_CHECKING:   # torch-free at import: `spotserve worker --help` parses with this module
    from spotserve.worker.engine.engine import EngineConfig

log = logging.getLogger(__name__)
AUTO = "auto"
CPU_DEFAULT_BLOCKS = 512   # --kv-blocks auto on CPU without --kv-memory-gib
GIB = 2**30


class KVCacheTooSmall(SpotserveError):
    """This GPU cannot hold the shard's weights plus one max-length sequence's KV cache."""


def parse_kv_blocks(text: str) -> int | None:
    """`--kv-blocks`: "auto" (None) or a positive number of blocks."""
    if text.strip().lower() == AUTO:
        return None
    try:
        blocks = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give 'auto' or a number of blocks"
                                         ) from None
    if blocks < 1:
        raise argparse.ArgumentTypeError(f"{blocks}: the KV cache needs at least one block")
    return blocks


@dataclass(frozen=True)
class KVBudget:
    """The worker's KV-cache flags."""

    blocks: int | None = None                  # --kv-blocks N; None: auto
    gpu_memory_utilization: float = USABLE_FRACTION
    kv_memory_bytes: int | None = None         # --kv-memory-gib, in bytes

    def __post_init__(self) -> None:
        if self.blocks is not None and self.blocks < 1:
            raise SpotserveError(f"--kv-blocks {self.blocks}: must be positive or auto")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise SpotserveError(f"--gpu-memory-utilization {self.gpu_memory_utilization}: "
                                 f"must be in (0, 1]")
        if self.kv_memory_bytes is not None and self.kv_memory_bytes <= 0:
            raise SpotserveError("--kv-memory-gib must be positive")

    @classmethod
    def from_flags(cls, kv_blocks: int | None, gpu_memory_utilization: float,
                   kv_memory_gib: float | None) -> KVBudget:
        return cls(kv_blocks, gpu_memory_utilization,
                   None if kv_memory_gib is None else int(kv_memory_gib * GIB))

    def describe(self) -> str:
        if self.blocks is not None:
            return f"{self.blocks} blocks"
        if self.kv_memory_bytes is not None:
            return f"auto ({self.kv_memory_bytes / GIB:g} GiB)"
        return f"auto (gpu_memory_utilization {self.gpu_memory_utilization:g})"


@dataclass(frozen=True)
class KVSize:
    """One configuration's KV cache on one worker, and where its size came from."""

    blocks: int
    block_size: int
    bytes_per_block: int                 # this shard's (layers x KV heads)
    source: str                          # kv-blocks | kv-memory | gpu-memory | cpu-default
    weight_bytes: int = 0                # this shard's weights
    total_memory: int | None = None      # the GPU's; None on CPU
    reserve_bytes: int = 0               # activation/workspace reserve (GPU only)
    raised: bool = False                 # raised to one max-length sequence

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_size

    @property
    def bytes(self) -> int:
        return self.blocks * self.bytes_per_block

    def fields(self) -> dict[str, Any]:
        """For the worker's log lines."""
        out: dict[str, Any] = {"kv_blocks": self.blocks, "kv_block_size": self.block_size,
                               "kv_tokens": self.tokens, "kv_bytes": self.bytes,
                               "kv_sizing": self.source}
        if self.total_memory is not None:
            out.update(gpu_memory=self.total_memory, shard_weight_bytes=self.weight_bytes,
                       reserve_bytes=self.reserve_bytes)
        if self.raised:
            out["kv_raised_to_max_model_len"] = True
        return out


def device_memory_bytes(device: str) -> int | None:
    """Total memory of a CUDA device; None for any other device (the tests' seam)."""
    import torch
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return int(torch.cuda.get_device_properties(index).total_memory)


def size_kv_cache(budget: KVBudget, model: ModelSpec, config: ParallelConfig,
                  position: Position, engine: EngineConfig, total_memory: int | None
                  ) -> KVSize:
    """The KV cache of the shard at `position` of `config` (`engine` gives the block size
    and the limits, its `max_model_len` already capped by the model); `total_memory` is
    the GPU's, None on CPU. Raises `KVCacheTooSmall` when the GPU cannot hold one
    max-length sequence next to the shard's weights."""
    limits, block_size = engine.scheduler, engine.block_size
    per_block = kv_bytes_per_block(model, config, position, block_size)
    weights = position_weight_bytes(model, config, position)
    reserve = 0 if total_memory is None else step_reserve_bytes(
        model, config, position, max_batched_tokens=limits.max_batched_tokens,
        max_num_seqs=limits.max_num_seqs, max_model_len=limits.max_model_len)

    def done(blocks: int, source: str, raised: bool = False) -> KVSize:
        out = KVSize(blocks, block_size, per_block, source, weights, total_memory, reserve,
                     raised)
        if total_memory is not None and weights + reserve + out.bytes > total_memory:
            raise KVCacheTooSmall(
                f"{_where(model, config, position)}: {blocks} KV blocks of {block_size} "
                f"tokens ({_gib(out.bytes)}, {source}) + model shard {_gib(weights)} + "
                f"activation reserve {_gib(reserve)} exceed the GPU's memory "
                f"{_gib(total_memory)}")
        return out

    if budget.blocks is not None:
        return done(budget.blocks, "kv-blocks")
    if budget.kv_memory_bytes is not None:
        blocks, source = budget.kv_memory_bytes // per_block, "kv-memory"
    elif total_memory is None:
        blocks, source = CPU_DEFAULT_BLOCKS, "cpu-default"
    else:
        usable = math.floor(total_memory * budget.gpu_memory_utilization)
        blocks, source = max(0, (usable - weights - reserve) // per_block), "gpu-memory"
    need = -(-limits.max_model_len // block_size)   # one max-length sequence
    if blocks >= need:
        return done(blocks, source)
    if total_memory is not None and weights + reserve + need * per_block > total_memory:
        raise KVCacheTooSmall(
            f"{_where(model, config, position)}: the GPU's memory {_gib(total_memory)} "
            f"(x {budget.gpu_memory_utilization:g} gpu_memory_utilization = "
            f"{_gib(int(total_memory * budget.gpu_memory_utilization))}) cannot hold the "
            f"model shard {_gib(weights)} + activation reserve {_gib(reserve)} + the KV "
            f"cache of one --max-model-len {limits.max_model_len} sequence "
            f"({need} blocks x {_gib(per_block)} = {_gib(need * per_block)}): needed "
            f"{_gib(weights + reserve + need * per_block)}; give this stage more GPUs "
            f"(tensor/pipeline parallel), a lower --max-model-len or a bigger GPU")
    log.warning("KV cache raised to one --max-model-len sequence",
                extra={"fields": {"blocks": blocks, "needed": need, "source": source}})
    return done(need, source, raised=True)


def _where(model: ModelSpec, config: ParallelConfig, position: Position) -> str:
    stage = config.stage_of(position)
    return (f"{model.name} layers [{stage.layer_start}, {stage.layer_end}) TP rank "
            f"{position.tp_rank} of {stage.tp}")


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB ({n} bytes)"
