"""The decoder's building blocks, holding only this rank's tensor-parallel slice.

Column-split projections (q/k/v, gate/up) produce this rank's heads or features; row-split
projections (o_proj, down_proj) produce partial sums that are all-reduced explicitly in
`forward`. A replicated bias is added after the reduction, so it counts once.

Projections that read the same input run as one matmul (q/k/v, and gate/up): their
weights live in one buffer, of which each HF-named parameter is a view, so loading,
serving and migrating by name is unchanged while a decode step launches two matmuls
fewer per layer and each is wider. Norms are one fused `rms_norm`; the rotary embedding
turns q and k in one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from spotserve.model_spec import ModelSpec
from spotserve.worker.model.attention import AttentionBatch, paged_attention, write_cache
from spotserve.worker.model.parallel import TensorParallel
from spotserve.worker.model.rope import apply_rotary

Shapes = Mapping[str, tuple[int, ...]]


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    # uninitialised: every parameter is loaded (`loader.load_into`) before use
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """`y = x W^T (+ b)` with HF parameter names and shapes from the shard layout."""

    def __init__(self, name: str, shapes: Shapes, dtype: torch.dtype, device: torch.device
                 ) -> None:
        super().__init__()
        self.weight = _param(shapes[f"{name}.weight"], dtype, device)
        bias = shapes.get(f"{name}.bias")
        self.bias = None if bias is None else _param(bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Fused:
    """One matmul for several column projections of the same input; their parameters
    become views of its weight (and bias) buffers."""

    def __init__(self, parts: list[Linear]) -> None:
        self.sizes = [p.weight.shape[0] for p in parts]
        self.weight = _merge([p.weight for p in parts])
        for part, view in zip(parts, torch.split(self.weight, self.sizes), strict=True):
            part.weight = _as_param(view)
        self.bias: torch.Tensor | None = None
        if all(p.bias is not None for p in parts):
            self.bias = _merge([p.bias for p in parts if p.bias is not None])
            for part, view in zip(parts, torch.split(self.bias, self.sizes), strict=True):
                part.bias = _as_param(view)
        self.parts = parts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The projections side by side [tokens, sum of their widths]. In fp32 on a CPU
        each part is its own matmul (on the same memory): MKL's sgemm runs a decode step's
        few rows ~10% slower against the merged weight (measured in the engine, batch 8)."""
        if x.device.type == "cpu" and self.weight.dtype == torch.float32:
            return torch.cat([p(x) for p in self.parts], -1)
        out = F.linear(x, self.weight, self.bias)
        if self.bias is None:   # some but not all have a bias (none do in HF's families)
            for part, piece in zip(self.parts, torch.split(out, self.sizes, -1), strict=True):
                if part.bias is not None:
                    piece += part.bias
        return out


def _merge(tensors: list[torch.Tensor]) -> torch.Tensor:
    first = tensors[0]
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    return torch.empty(shape, dtype=first.dtype, device=first.device)


def _as_param(view: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(view, requires_grad=False)


class RowLinear(Linear):
    """Row-parallel: local matmul, all-reduce, then the (replicated) bias."""

    def forward(self, x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:  # type: ignore[override]
        out = tp.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device,
                 gemma: bool = False) -> None:
        super().__init__()
        self.weight = _param((size,), dtype, device)
        self.eps, self.gemma = eps, gemma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """HF's: normalised in fp32, cast back, then scaled (one kernel in fp32). Gemma's
        scales by (1 + weight), in fp32, then casts."""
        shape = (x.shape[-1],)
        if self.gemma:
            normed = F.rms_norm(x.float(), shape, eps=self.eps)
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), shape, eps=self.eps).to(x.dtype)


def norm(model: ModelSpec, size: int, dtype: torch.dtype, device: torch.device) -> RMSNorm:
    """The model's RMSNorm over `size` features."""
    return RMSNorm(size, model.rms_norm_eps, dtype, device, gemma=model.gemma_style)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": _gelu_tanh}


class Attention(nn.Module):
    def __init__(self, model: ModelSpec, prefix: str, shapes: Shapes, tp: TensorParallel,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.tp, self.head_dim = tp, model.head_dim
        self.q_proj = Linear(f"{prefix}.q_proj", shapes, dtype, device)
        self.k_proj = Linear(f"{prefix}.k_proj", shapes, dtype, device)
        self.v_proj = Linear(f"{prefix}.v_proj", shapes, dtype, device)
        self.o_proj = RowLinear(f"{prefix}.o_proj", shapes, dtype, device)
        self.qkv = Fused([self.q_proj, self.k_proj, self.v_proj])
        self.q_norm = self.k_norm = None
        if model.qk_norm:
            self.q_norm = norm(model, model.head_dim, dtype, device)
            self.k_norm = norm(model, model.head_dim, dtype, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor], batch: AttentionBatch
                ) -> torch.Tensor:
        tokens, d = x.shape[0], self.head_dim
        heads, kv_heads, _ = (n // d for n in self.qkv.sizes)
        qkv = self.qkv(x).view(tokens, -1, d)
        if self.q_norm is not None and self.k_norm is not None:
            q, k, v = torch.split(qkv, [heads, kv_heads, kv_heads], 1)
            q, k = apply_rotary(self.q_norm(q), cos, sin), apply_rotary(self.k_norm(k), cos, sin)
        else:   # q and k turned together
            qk = apply_rotary(qkv[:, :heads + kv_heads], cos, sin)
            q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads:]
        write_cache(cache[0], batch, k)
        write_cache(cache[1], batch, v)
        out = paged_attention(q, cache[0], cache[1], batch, d ** -0.5)
        return self.o_proj.forward(out, self.tp)


class MLP(nn.Module):
    def __init__(self, prefix: str, shapes: Shapes, tp: TensorParallel, dtype: torch.dtype,
                 device: torch.device, act: str = "silu") -> None:
        super().__init__()
        self.tp, self.act = tp, ACTIVATION_FNS[act]
        self.gate_proj = Linear(f"{prefix}.gate_proj", shapes, dtype, device)
        self.up_proj = Linear(f"{prefix}.up_proj", shapes, dtype, device)
        self.down_proj = RowLinear(f"{prefix}.down_proj", shapes, dtype, device)
        self.gate_up = Fused([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.split(self.gate_up(x), self.gate_up.sizes, -1)
        return self.down_proj.forward(self.act(gate) * up, self.tp)


class DecoderLayer(nn.Module):
    def __init__(self, model: ModelSpec, layer: int, shapes: Shapes, tp: TensorParallel,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        prefix, h = f"model.layers.{layer}", model.hidden_size
        self.input_layernorm = norm(model, h, dtype, device)
        self.self_attn = Attention(model, f"{prefix}.self_attn", shapes, tp, dtype, device)
        self.post_attention_layernorm = norm(model, h, dtype, device)
        self.mlp = MLP(f"{prefix}.mlp", shapes, tp, dtype, device, model.hidden_act)

    def use_tp(self, tp: TensorParallel) -> None:
        """Reduce over `tp` from now on (the layer kept into a new epoch's groups)."""
        self.self_attn.tp = self.mlp.tp = tp

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor], batch: AttentionBatch
                ) -> torch.Tensor:
        x = x + self.self_attn.forward(self.input_layernorm(x), cos, sin, cache, batch)
        return x + self.mlp.forward(self.post_attention_layernorm(x))
