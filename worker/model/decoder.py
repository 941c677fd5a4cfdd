"""One pipeline stage of a Llama-family decoder, holding one tensor-parallel slice.

Parameters keep their Hugging Face names (`model.layers.7.self_attn.q_proj.weight`), and
their shapes are exactly the slices `spotserve.layout.position_slices` assigns to the
position, so a checkpoint slice loads into them by name. The first stage embeds token ids;
the last applies the final norm and, on request, the LM head. With a vocabulary split the
embedding lookup is a masked local lookup plus an all-reduce, and the logits a local matmul
plus an all-gather.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spotserve.errors import SpotserveError
from spotserve.layout import ParallelConfig, Position, kv_heads, position_slices, shard_units
from spotserve.model_spec import ModelSpec
from spotserve.worker.model.attention import AttentionBatch
from spotserve.worker.model.layers import DecoderLayer, RMSNorm, Shapes, _param
from spotserve.worker.model.parallel import TensorParallel
from spotserve.worker.model.rope import RotaryEmbedding

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}
# LM head rows per matmul for fp32 on CPU (see `vocab_logits`)
CPU_VOCAB_CHUNK = 2048
KVCaches = Sequence[tuple[torch.Tensor, torch.Tensor]]


class _Body(nn.Module):
    """The `model.` prefix of the HF names."""

    def __init__(self, model: ModelSpec, shapes: Shapes, layers: range, tp: TensorParallel,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        embed = shapes.get("model.embed_tokens.weight")
        self.embed_tokens = None if embed is None else _Embedding(embed, dtype, device)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(model, i, shapes, tp, dtype, device)
                                     for i in layers})
        norm = "model.norm.weight" in shapes
        self.norm = RMSNorm(model.hidden_size, model.rms_norm_eps, dtype, device) if norm else None


class _Embedding(nn.Module):
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = _param(shape, dtype, device)


class StageModel(nn.Module):
    """Layers [start, end) of one pipeline stage, TP slice `tp.rank` of `tp.size`."""

    def __init__(self, model: ModelSpec, config: ParallelConfig, position: Position,
                 tp: TensorParallel | None = None, device: torch.device | str = "cpu") -> None:
        super().__init__()
        stage = config.stage_of(position)
        self.spec, self.position = model, position
        self.tp = tp or TensorParallel()
        self.is_first = position.stage == 0
        self.is_last = config.is_last_stage(position)
        self.layer_range, self.stage_tp = stage.layers(), stage.tp
        self.device, self.dtype = torch.device(device), TORCH_DTYPES[model.dtype]
        self.slices = position_slices(model, config, position)
        shapes = {s.tensor: s.shape(model.tensor(s.tensor).shape) for s in self.slices}
        self.model = _Body(model, shapes, self.layer_range, self.tp, self.dtype, self.device)
        head = None
        if self.is_last and not model.tie_word_embeddings:
            head = _param(shapes["lm_head.weight"], self.dtype, self.device)
        self.lm_head = None if head is None else _Head(head)
        vocab = [shard_units(model.vocab_size, stage.tp, r) for r in range(stage.tp)]
        self.vocab_ranges = vocab
        self.rotary = RotaryEmbedding(model, self.device)
        self.sliding_window = sliding_window(model)

    # ---- forward ----------------------------------------------------------------------
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        assert self.model.embed_tokens is not None, "only the first stage embeds tokens"
        weight = self.model.embed_tokens.weight
        if self.tp.size == 1:
            return F.embedding(token_ids, weight)
        lo, hi = self.vocab_ranges[self.tp.rank]
        inside = (token_ids >= lo) & (token_ids < hi)
        local = F.embedding((token_ids - lo).clamp(0, hi - lo - 1), weight)
        return self.tp.all_reduce(local * inside[:, None].to(local.dtype))

    def forward(self, inputs: torch.Tensor, batch: AttentionBatch, caches: KVCaches
                ) -> torch.Tensor:
        """Token ids [tokens] (first stage) or hidden states [tokens, hidden] → hidden
        states [tokens, hidden] (normalised on the last stage)."""
        hidden = self.embed(inputs) if self.is_first else inputs
        cos, sin = self.rotary.tables(batch.positions, hidden.dtype)
        for cache, layer in zip(caches, self.model.layers.values(), strict=True):
            hidden = layer(hidden, cos, sin, cache, batch)
        if self.is_last:
            assert self.model.norm is not None
            hidden = self.model.norm(hidden)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary fp32 logits for the given (normalised) hidden states."""
        local = vocab_logits(hidden, self.head_weight)
        sizes = [hi - lo for lo, hi in self.vocab_ranges]
        return self.tp.all_gather_last_dim(local, sizes).float()

    @property
    def head_weight(self) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head.weight
        assert self.model.embed_tokens is not None, "tied LM head needs the embedding"
        return self.model.embed_tokens.weight

    @property
    def kv_head_range(self) -> tuple[int, int]:
        """The KV heads [start, stop) this rank caches."""
        return kv_heads(self.spec, self.stage_tp, self.position.tp_rank)


def vocab_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`hidden @ weight.T` for an LM head of many rows. In fp32 on CPU it is taken
    `CPU_VOCAB_CHUNK` rows at a time: with a few rows of hidden states (decode), MKL's sgemm
    runs ~25% faster on such pieces than on a whole vocabulary, and each logit is the same
    dot product. Elsewhere one matmul: bf16 on CPU is slower in pieces, and a GPU has
    nothing to gain from more launches."""
    if hidden.device.type != "cpu" or weight.dtype != torch.float32:
        return F.linear(hidden, weight)
    return torch.cat([F.linear(hidden, rows) for rows in torch.split(weight, CPU_VOCAB_CHUNK)],
                     -1)


def sliding_window(model: ModelSpec) -> int | None:
    """Mistral's attention window (None: full attention)."""
    config = model.hf_config
    if model.family == "qwen2" and config.get("use_sliding_window"):
        raise SpotserveError("Qwen2 with use_sliding_window is not supported")
    window = config.get("sliding_window") if model.family == "mistral" else None
    return int(window) if window else None


class _Head(nn.Module):
    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight
