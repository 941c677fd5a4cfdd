"""Model shapes: every tensor's name, shape and tensor-parallel split rule, and byte counts.

A `ModelSpec` is built from a Hugging Face `config.json` (Llama family: Llama 2/3,
Mistral, Qwen2/2.5, Qwen3, Gemma) or taken from the built-in shapes (`builtin_models`). The
planner, the worker's loader, the migration planner and the tests all read tensor
names, split rules and byte counts from here and nowhere else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any

from spotserve.errors import SpotserveError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
                  "float": "float32"}

# architectures value in config.json -> family name
_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
}
LLAMA_FAMILIES = frozenset(_HF_ARCHITECTURES.values())
# MLP activations the engine runs (transformers' ACT2FN names)
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")


class Split(Enum):
    """How a tensor is divided among the ranks of a tensor-parallel group.

    COLUMN splits the output features (dim 0 of a HF `nn.Linear` weight, and its bias);
    ROW splits the input features (dim 1); VOCAB splits the vocabulary rows of an embedding
    or LM head (dim 0); REPLICATED tensors are held whole by every rank.
    """

    COLUMN = "column"
    ROW = "row"
    VOCAB = "vocab"
    REPLICATED = "replicated"

    @property
    def dim(self) -> int | None:
        return {Split.COLUMN: 0, Split.ROW: 1, Split.VOCAB: 0}.get(self)


@dataclass(frozen=True)
class TensorSpec:
    """One weight tensor. `unit` is the granularity of the split (head_dim for attention
    projections, so a rank always holds whole heads); `kv` marks key/value projections,
    whose heads are replicated when the TP degree exceeds the number of KV heads."""

    name: str
    shape: tuple[int, ...]
    split: Split
    layer: int | None = None
    unit: int = 1
    kv: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def units(self) -> int:
        """Number of indivisible units along the split dimension."""
        dim = self.split.dim
        return 1 if dim is None else self.shape[dim] // self.unit


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer, enough to place, load and cost it."""

    name: str
    family: str  # llama | mistral | qwen2 | qwen3 | gemma | opt
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position: int
    dtype: str = "bfloat16"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    mlp_bias: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    hidden_act: str = "silu"          # the MLP's gate activation
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    hf_config: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False,
                                         repr=False)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise SpotserveError(f"unsupported dtype {self.dtype!r}; use one of "
                                 f"{', '.join(DTYPE_BYTES)}")
        for attr in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, attr) <= 0:
                raise SpotserveError(f"model {self.name}: {attr} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise SpotserveError(f"model {self.name}: num_attention_heads ({self.num_heads}) "
                                 f"is not a multiple of num_key_value_heads ({self.num_kv_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise SpotserveError(f"model {self.name}: activation {self.hidden_act!r} is not one "
                                 f"the engine runs ({', '.join(ACTIVATIONS)})")

    # ---- identity -------------------------------------------------------------------
    @property
    def is_llama_family(self) -> bool:
        """True for the families the worker's engine can run (others are for planning)."""
        return self.family in LLAMA_FAMILIES

    @property
    def gemma_style(self) -> bool:
        """Gemma's differences from Llama: norms scale by (1 + weight), in fp32, and the
        embedding is multiplied by sqrt(hidden_size)."""
        return self.family == "gemma"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def with_dtype(self, dtype: str) -> ModelSpec:
        from dataclasses import replace
        return replace(self, dtype=normalize_dtype(dtype), hf_config=self.hf_config)

    # ---- tensors --------------------------------------------------------------------
    def layer_tensors(self, layer: int) -> tuple[TensorSpec, ...]:
        if not 0 <= layer < self.num_layers:
            raise SpotserveError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        if self.family == "opt":
            return _opt_layer(self, layer)
        return _llama_layer(self, layer)

    def global_tensors(self) -> tuple[TensorSpec, ...]:
        """Tensors outside the layers: embeddings, final norm, LM head."""
        h, v = self.hidden_size, self.vocab_size
        if self.family == "opt":
            out = [TensorSpec("model.decoder.embed_tokens.weight", (v, h), Split.VOCAB),
                   TensorSpec("model.decoder.embed_positions.weight", (self.max_position + 2, h),
                              Split.REPLICATED),
                   TensorSpec("model.decoder.final_layer_norm.weight", (h,), Split.REPLICATED),
                   TensorSpec("model.decoder.final_layer_norm.bias", (h,), Split.REPLICATED)]
        else:
            out = [TensorSpec("model.embed_tokens.weight", (v, h), Split.VOCAB),
                   TensorSpec("model.norm.weight", (h,), Split.REPLICATED)]
        if not self.tie_word_embeddings:
            out.append(TensorSpec("lm_head.weight", (v, h), Split.VOCAB))
        return tuple(out)

    @property
    def embedding_name(self) -> str:
        return self.global_tensors()[0].name

    @property
    def lm_head_name(self) -> str:
        """The tensor the last stage multiplies hidden states by (the embedding when tied)."""
        return self.embedding_name if self.tie_word_embeddings else "lm_head.weight"

    def tensors(self) -> tuple[TensorSpec, ...]:
        out = list(self.global_tensors())
        for layer in range(self.num_layers):
            out.extend(self.layer_tensors(layer))
        return tuple(out)

    def tensor(self, name: str) -> TensorSpec:
        spec = _tensor_index(self).get(name)
        if spec is None:
            raise SpotserveError(f"model {self.name} has no tensor {name!r}")
        return spec

    # ---- sizes ----------------------------------------------------------------------
    @property
    def layer_params(self) -> int:
        return sum(t.numel for t in self.layer_tensors(0))

    @property
    def global_params(self) -> int:
        return sum(t.numel for t in self.global_tensors())

    @property
    def num_parameters(self) -> int:
        return self.layer_params * self.num_layers + self.global_params

    @property
    def weight_bytes_per_layer(self) -> int:
        return self.layer_params * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        return self.num_parameters * self.dtype_bytes

    @property
    def kv_bytes_per_token_per_head(self) -> int:
        """Key and value cache bytes one token adds to one layer for one KV head: the one
        formula every KV byte count (whole model, a GPU's shard, a cache block) builds on."""
        return 2 * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """Key and value cache bytes one token adds to one layer (all KV heads)."""
        return self.kv_bytes_per_token_per_head * self.num_kv_heads

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_per_layer * self.num_layers

    def supports_tp(self, tp: int) -> bool:
        """Whether TP degree `tp` keeps whole attention heads on every rank."""
        if tp < 1 or self.num_heads % tp or tp > min(self.intermediate_size, self.vocab_size):
            return False
        return self.num_kv_heads % tp == 0 or tp % self.num_kv_heads == 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "dtype": self.dtype,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_layers": self.num_layers, "num_heads": self.num_heads,
                "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "vocab_size": self.vocab_size, "max_position": self.max_position,
                "parameters": self.num_parameters, "weight_bytes": self.weight_bytes,
                "weight_bytes_per_layer": self.weight_bytes_per_layer,
                "kv_bytes_per_token": self.kv_bytes_per_token}

    # ---- construction ---------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, source: str | Path | Mapping[str, Any], *,
                       name: str | None = None, dtype: str | None = None) -> ModelSpec:
        """Build from a HF `config.json` (a path to the file or its folder, or the dict)."""
        if isinstance(source, Mapping):
            config, default_name = dict(source), str(source.get("_name_or_path") or "model")
        else:
            config, default_name = _read_config(Path(source))
        return _from_config(config, name or default_name, dtype)


def normalize_dtype(dtype: str) -> str:
    key = dtype.lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        raise SpotserveError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")
    return key


@lru_cache(maxsize=64)
def _tensor_index(model: ModelSpec) -> dict[str, TensorSpec]:
    return {t.name: t for t in model.tensors()}


def _linear(prefix: str, out_f: int, in_f: int, split: Split, layer: int, *, bias: bool,
            bias_split: Split | None = None, unit: int = 1, kv: bool = False) -> list[TensorSpec]:
    out = [TensorSpec(f"{prefix}.weight", (out_f, in_f), split, layer, unit, kv)]
    if bias:
        out.append(TensorSpec(f"{prefix}.bias", (out_f,), bias_split or split, layer, unit, kv))
    return out


def _llama_layer(m: ModelSpec, layer: int) -> tuple[TensorSpec, ...]:
    p, h, d = f"model.layers.{layer}", m.hidden_size, m.head_dim
    q_out, kv_out = m.num_heads * d, m.num_kv_heads * d
    out = _linear(f"{p}.self_attn.q_proj", q_out, h, Split.COLUMN, layer, bias=m.qkv_bias, unit=d)
    out += _linear(f"{p}.self_attn.k_proj", kv_out, h, Split.COLUMN, layer, bias=m.qkv_bias,
                   unit=d, kv=True)
    out += _linear(f"{p}.self_attn.v_proj", kv_out, h, Split.COLUMN, layer, bias=m.qkv_bias,
                   unit=d, kv=True)
    out += _linear(f"{p}.self_attn.o_proj", h, q_out, Split.ROW, layer, bias=False, unit=d)
    if m.qk_norm:
        out += [TensorSpec(f"{p}.self_attn.q_norm.weight", (d,), Split.REPLICATED, layer),
                TensorSpec(f"{p}.self_attn.k_norm.weight", (d,), Split.REPLICATED, layer)]
    i = m.intermediate_size
    out += _linear(f"{p}.mlp.gate_proj", i, h, Split.COLUMN, layer, bias=m.mlp_bias)
    out += _linear(f"{p}.mlp.up_proj", i, h, Split.COLUMN, layer, bias=m.mlp_bias)
    out += _linear(f"{p}.mlp.down_proj", h, i, Split.ROW, layer, bias=m.mlp_bias,
                   bias_split=Split.REPLICATED)
    out += [TensorSpec(f"{p}.input_layernorm.weight", (h,), Split.REPLICATED, layer),
            TensorSpec(f"{p}.post_attention_layernorm.weight", (h,), Split.REPLICATED, layer)]
    return tuple(out)


def _opt_layer(m: ModelSpec, layer: int) -> tuple[TensorSpec, ...]:
    p, h, d = f"model.decoder.layers.{layer}", m.hidden_size, m.head_dim
    q_out = m.num_heads * d
    out: list[TensorSpec] = []
    for proj, kv in (("q_proj", False), ("k_proj", True), ("v_proj", True)):
        out += _linear(f"{p}.self_attn.{proj}", q_out, h, Split.COLUMN, layer, bias=True, unit=d,
                       kv=kv)
    out += _linear(f"{p}.self_attn.out_proj", h, q_out, Split.ROW, layer, bias=True,
                   bias_split=Split.REPLICATED, unit=d)
    out += _linear(f"{p}.fc1", m.intermediate_size, h, Split.COLUMN, layer, bias=True)
    out += _linear(f"{p}.fc2", h, m.intermediate_size, Split.ROW, layer, bias=True,
                   bias_split=Split.REPLICATED)
    for norm in ("self_attn_layer_norm", "final_layer_norm"):
        out += [TensorSpec(f"{p}.{norm}.weight", (h,), Split.REPLICATED, layer),
                TensorSpec(f"{p}.{norm}.bias", (h,), Split.REPLICATED, layer)]
    return tuple(out)


def _read_config(path: Path) -> tuple[dict[str, Any], str]:
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise SpotserveError(f"{file}: no such file (expected a HF config.json or its folder)")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise SpotserveError(f"{file}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SpotserveError(f"{file}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(config, dict):
        raise SpotserveError(f"{file}: expected a JSON object")
    name = file.parent.name if file.name == "config.json" else file.stem
    return config, name or "model"


def _family(config: Mapping[str, Any]) -> str:
    archs = config.get("architectures") or []
    for arch in archs if isinstance(archs, list) else []:
        if arch in _HF_ARCHITECTURES:
            return _HF_ARCHITECTURES[arch]
    model_type = config.get("model_type")
    if model_type in LLAMA_FAMILIES:
        return str(model_type)
    shown = archs or model_type or "none given"
    raise SpotserveError(f"unsupported architecture {shown}; supported: "
                         f"{', '.join(sorted(_HF_ARCHITECTURES))}")


def _int(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpotserveError(f"config.json: {key} must be a positive integer (got {value!r})")
    return value


def _from_config(config: Mapping[str, Any], name: str, dtype: str | None) -> ModelSpec:
    family = _family(config)
    heads = _int(config, "num_attention_heads")
    hidden = _int(config, "hidden_size")
    head_dim = config.get("head_dim") or hidden // heads
    eos = config.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    # transformers >= 5 writes rope_theta and the scaling into one rope_parameters dict
    rope = config.get("rope_parameters")
    rope = rope if isinstance(rope, dict) else {}
    scaling = config.get("rope_scaling") or {}
    if not scaling and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    raw_dtype = dtype or config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    # Gemma: transformers 4 runs hidden_activation, else GELU (tanh), whatever hidden_act
    # says; the public configs name gelu_pytorch_tanh there or nothing
    act = (config.get("hidden_activation") or "gelu_pytorch_tanh") if family == "gemma" \
        else config.get("hidden_act") or "silu"
    return ModelSpec(
        name=name, family=family, hidden_size=hidden,
        intermediate_size=_int(config, "intermediate_size"),
        num_layers=_int(config, "num_hidden_layers"), num_heads=heads,
        num_kv_heads=_int(config, "num_key_value_heads", heads),
        head_dim=int(head_dim), vocab_size=_int(config, "vocab_size"),
        max_position=_int(config, "max_position_embeddings", 4096),
        dtype=normalize_dtype(str(raw_dtype)),
        # Gemma's configs leave the key out: its default is tied
        tie_word_embeddings=bool(config.get("tie_word_embeddings", family == "gemma")),
        qkv_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
        qk_norm=family == "qwen3", mlp_bias=bool(config.get("mlp_bias", False)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(config.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rope_scaling=tuple(sorted(scaling.items())) if isinstance(scaling, dict) else (),
        hidden_act=str(act), bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids,
        hf_config=dict(config))
