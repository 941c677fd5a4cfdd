"""One pipeline stage of a Llama-family decoder, holding one tensor-parallel slice.

Parameters keep their Hugging Face names (`model.layers.7.self_attn.q_proj.weight`), and
their shapes are exactly the slices `spotserve.layout.position_slices` assigns to the
position, so a checkpoint slice loads into them by name. The first stage embeds token ids;
the last applies the final norm and, on request, the LM head. With a vocabulary split the
embedding lookup is a masked local lookup plus an all-reduce, and the logits a local matmul
plus an all-gather.

A new configuration's stage can take over what the previous stage of the same model holds
on the device: a whole layer whose every slice is unchanged (same layer, same TP degree and
rank), and the embedding, final norm and LM head when their slices are unchanged. Those are
neither copied nor re-read: a GPU that keeps its layers through a re-partition builds its
new stage from what it has, at no transfer and no second copy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spotserve.errors import SpotserveError
from spotserve.layout import (
    ParallelConfig,
    Position,
    TensorSlice,
    kv_heads,
    position_slices,
    shard_units,
)
from spotserve.model_spec import ModelSpec
from spotserve.worker.model.attention import AttentionBatch
from spotserve.worker.model.layers import DecoderLayer, RMSNorm, Shapes, _param, norm
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
                 dtype: torch.dtype, device: torch.device, old: _Body | None = None,
                 keep: set[str] | frozenset[str] = frozenset()) -> None:
        super().__init__()
        embed = shapes.get("model.embed_tokens.weight")
        self.embed_tokens: _Embedding | None = None
        if old is not None and "model.embed_tokens.weight" in keep:
            self.embed_tokens = old.embed_tokens
        elif embed is not None:
            self.embed_tokens = _Embedding(embed, dtype, device)
        self.layers = nn.ModuleDict()
        for i in layers:
            if old is not None and _layer_kept(keep, i):
                layer = old.layers[str(i)]
                assert isinstance(layer, DecoderLayer)
                layer.use_tp(tp)
            else:
                layer = DecoderLayer(model, i, shapes, tp, dtype, device)
            self.layers[str(i)] = layer
        self.norm: RMSNorm | None = None
        if old is not None and "model.norm.weight" in keep:
            self.norm = old.norm
        elif "model.norm.weight" in shapes:
            self.norm = norm(model, model.hidden_size, dtype, device)


class _Embedding(nn.Module):
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = _param(shape, dtype, device)


class StageModel(nn.Module):
    """Layers [start, end) of one pipeline stage, TP slice `tp.rank` of `tp.size`."""

    def __init__(self, model: ModelSpec, config: ParallelConfig, position: Position,
                 tp: TensorParallel | None = None, device: torch.device | str = "cpu",
                 reuse: StageModel | None = None) -> None:
        """`reuse`: the previous stage of this worker, of the same checkpoint; it hands over
        what `reusable` allows and gives up the rest (freed before anything new is
        allocated, so the device never holds two stages)."""
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
        self.reused: set[str] = set()
        old = None
        if reuse is not None:
            self.reused = reusable(reuse, self.slices, self.dtype, self.device)
            old = reuse.give_up(self.reused)
        self.model = _Body(model, shapes, self.layer_range, self.tp, self.dtype, self.device,
                           old, self.reused)
        self.lm_head: _Head | None = None
        if reuse is not None and "lm_head.weight" in self.reused:
            self.lm_head = reuse.lm_head
        elif self.is_last and not model.tie_word_embeddings:
            self.lm_head = _Head(_param(shapes["lm_head.weight"], self.dtype, self.device))
        if reuse is not None:
            reuse.lm_head = None
        vocab = [shard_units(model.vocab_size, stage.tp, r) for r in range(stage.tp)]
        self.vocab_ranges = vocab
        self.rotary = RotaryEmbedding(model, self.device)
        self.sliding_window = sliding_window(model)

    def give_up(self, keep: set[str]) -> _Body:
        """Drop every module holding a tensor not in `keep` (so its memory is freed now);
        the body, with what is left, for the next stage to take from."""
        body = self.model
        for name in list(body.layers):
            if not _layer_kept(keep, name):
                del body.layers[name]
        if "model.embed_tokens.weight" not in keep:
            body.embed_tokens = None
        if "model.norm.weight" not in keep:
            body.norm = None
        if "lm_head.weight" not in keep:
            self.lm_head = None
        return body

    # ---- forward ----------------------------------------------------------------------
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        assert self.model.embed_tokens is not None, "only the first stage embeds tokens"
        weight = self.model.embed_tokens.weight
        if self.tp.size == 1:
            out = F.embedding(token_ids, weight)
        else:
            lo, hi = self.vocab_ranges[self.tp.rank]
            inside = (token_ids >= lo) & (token_ids < hi)
            local = F.embedding((token_ids - lo).clamp(0, hi - lo - 1), weight)
            out = self.tp.all_reduce(local * inside[:, None].to(local.dtype))
        if self.spec.gemma_style:   # scaled in the activations' dtype, as HF does
            out = out * torch.tensor(self.spec.hidden_size ** 0.5, dtype=out.dtype)
        return out

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


def _layer_kept(keep: set[str] | frozenset[str], layer: int | str) -> bool:
    """Whether layer `layer` is taken over (`reusable` keeps a layer whole or not at all,
    so one of its tensors tells)."""
    return f"model.layers.{layer}.input_layernorm.weight" in keep


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def reusable(old: StageModel, slices: Sequence[TensorSlice], dtype: torch.dtype,
             device: torch.device) -> set[str]:
    """The tensors among `slices` a new stage takes from `old` as they are: same slice,
    dtype and device; a layer only whole (its projections share buffers). The caller
    vouches that both are the same checkpoint."""
    if old.dtype != dtype or old.device != device:
        return set()
    held = {s.tensor: s for s in old.slices}
    same = {s.tensor for s in slices if held.get(s.tensor) == s}
    by_layer: dict[str, set[str]] = {}
    for s in slices:
        match = _LAYER.match(s.tensor)
        if match:
            by_layer.setdefault(match.group(1), set()).add(s.tensor)
    for names in by_layer.values():
        if not names <= same:
            same -= names
    return same


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
