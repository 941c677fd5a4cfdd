"""GPU memory budget: how much of a GPU serving can use, how many GPUs a model needs, and
how many KV-cache blocks one GPU's shard has room for.

The planner's memory check, `spotserve model-info` and the worker's KV-cache sizing
(`spotserve worker --kv-blocks auto`) all use these, so "fits" means the same thing
everywhere; KV bytes always come from the layout math (`position_kv_bytes_per_token`).
"""

from __future__ import annotations

import math

from spotserve.catalog import GPUSpec
from spotserve.layout import ParallelConfig, Position, kv_heads, position_kv_bytes_per_token
from spotserve.model_spec import ModelSpec

# Share of GPU memory left for weights and KV cache after the CUDA context, the
# allocator's fragmentation and activation buffers (vLLM's default is 0.9 as well).
USABLE_FRACTION = 0.9


def usable_memory_bytes(gpu: GPUSpec, fraction: float = USABLE_FRACTION) -> int:
    return int(gpu.memory_bytes * fraction)


def min_gpus(model: ModelSpec, gpu: GPUSpec, kv_tokens: int = 0,
             fraction: float = USABLE_FRACTION) -> int:
    """Fewest GPUs of type `gpu` whose usable memory holds the weights plus the KV cache of
    `kv_tokens` tokens, assuming an even split (pipeline and tensor parallel combined)."""
    need = model.weight_bytes + model.kv_bytes_per_token * kv_tokens
    return max(1, math.ceil(need / usable_memory_bytes(gpu, fraction)))


# ---- one GPU's KV cache ----------------------------------------------------------------
# Scratch outside any step's tensors: cuBLAS/cuDNN workspaces, NCCL buffers, the caching
# allocator's rounding.
WORKSPACE_BYTES = 512 * 2**20
LOGITS_BYTES = 4   # logits are fp32 whatever the model's dtype


def kv_bytes_per_block(model: ModelSpec, config: ParallelConfig, position: Position,
                       block_size: int) -> int:
    """KV-cache bytes one block of `block_size` tokens takes on the GPU at `position` (its
    stage's layers, its KV heads): `position_kv_bytes_per_token`, the planner's figure."""
    return position_kv_bytes_per_token(model, config, position) * block_size


def step_reserve_bytes(model: ModelSpec, config: ParallelConfig, position: Position, *,
                       max_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> int:
    """A bound on the transient bytes one engine step takes on the GPU at `position`, on top
    of its weights and KV cache (what vLLM measures by profiling a step), read off the
    shapes the worker's engine uses:

    - the step's flat tokens (at most `max_batched_tokens`) through one layer: residual,
      normed and attention-output hidden states, this rank's q/k/v heads, and the MLP's
      gate, up and product;
    - a prefill or mixed step's padded attention: [sequences, longest query] queries,
      SDPA's output and its transposed copy, the boolean mask over the longest context and
      the additive bias SDPA makes of it, and one layer's keys and values gathered for
      every sequence;
    - fp32 logits (and their all-gathered copy) of a step's sampled rows on the last stage;
    - `WORKSPACE_BYTES` of library workspaces.
    """
    stage = config.stage_of(position)
    tp, dtype = stage.tp, model.dtype_bytes
    heads = -(-model.num_heads // tp)
    lo, hi = kv_heads(model, tp, position.tp_rank)
    tokens = max_batched_tokens
    flat = tokens * dtype * (4 * model.hidden_size + (heads + 2 * (hi - lo)) * model.head_dim
                             + 3 * -(-model.intermediate_size // tp))
    padded = max_num_seqs * min(max_batched_tokens, max_model_len)
    attention = (3 * padded * heads * model.head_dim * dtype
                 + padded * max_model_len * (1 + dtype)
                 + max_num_seqs * max_model_len
                 * position_kv_bytes_per_token(model, config, position) // stage.num_layers)
    logits = 0
    if config.is_last_stage(position):
        logits = 2 * min(max_num_seqs, tokens) * model.vocab_size * LOGITS_BYTES
    return WORKSPACE_BYTES + flat + attention + logits
