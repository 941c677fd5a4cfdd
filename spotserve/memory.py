"""GPU memory budget: how much of a GPU serving can use, and how many GPUs a model needs.

The planner's memory check and `spotserve model-info` both use these, so "fits" means
the same thing everywhere.
"""

from __future__ import annotations

import math

from spotserve.catalog import GPUSpec
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
