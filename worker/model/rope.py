"""Rotary position embeddings with the Hugging Face rotate-half convention.

Frequencies follow `rope_theta` and `rope_scaling` from the model's config.json: no scaling,
"linear" (positions divided by a factor) and "llama3" (Llama 3.1's frequency-band
smoothing). Tables are computed in fp32, as the reference implementation does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from spotserve.errors import SpotserveError
from spotserve.model_spec import ModelSpec


def inverse_frequencies(model: ModelSpec) -> torch.Tensor:
    """One frequency per pair of rotated dimensions (head_dim / 2 values, fp32)."""
    dim = model.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (model.rope_theta ** exponents)
    scaling = dict(model.rope_scaling)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    raise SpotserveError(f"rope_scaling type {kind!r} is not supported "
                         "(supported: default, linear, llama3)")


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: Mapping[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend
    between the two band edges."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding:
    """cos/sin tables for a batch of token positions."""

    def __init__(self, model: ModelSpec, device: torch.device | str = "cpu") -> None:
        self.inv_freq = inverse_frequencies(model).to(device)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape [tokens, head_dim] for `positions` [tokens]."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [tokens, heads, head_dim] by the per-token tables [tokens, head_dim]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + rotate_half(x) * sin
