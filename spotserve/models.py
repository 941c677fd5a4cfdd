"""Built-in model shapes and name resolution (`--model NAME|CONFIG`).

The paper's three models (SpotServe's OPT-6.7B, GPT-20B and the 30B OPT-shaped model, in
fp32 as evaluated there) come from the shapes in the SpotServe artifact's model configs;
Llama-3.1-8B/70B and Qwen3-32B are their published `config.json` values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spotserve.errors import SpotserveError
from spotserve.model_spec import ModelSpec

_LLAMA31_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def _llama31(hidden: int, inter: int, layers: int, heads: int) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": 8, "vocab_size": 128256,
            "max_position_embeddings": 131072, "rope_theta": 500000.0,
            "rope_scaling": _LLAMA31_SCALING, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
            "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
            "tie_word_embeddings": False}


_HF_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": _llama31(4096, 14336, 32, 32),
    "llama-3.1-70b": _llama31(8192, 28672, 80, 64),
    "qwen3-32b": {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 5120,
                  "intermediate_size": 25600, "num_hidden_layers": 64,
                  "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
                  "vocab_size": 151936, "max_position_embeddings": 40960,
                  "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
                  "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": False},
}


def _opt(name: str, hidden: int, heads: int, layers: int, inter: int, vocab: int) -> ModelSpec:
    return ModelSpec(name=name, family="opt", hidden_size=hidden, intermediate_size=inter,
                     num_layers=layers, num_heads=heads, num_kv_heads=heads,
                     head_dim=hidden // heads, vocab_size=vocab, max_position=2048,
                     dtype="float32", tie_word_embeddings=True, eos_token_ids=(50256,))


def builtin_models() -> dict[str, ModelSpec]:
    """Name → spec for every built-in model."""
    models = {
        "opt-6.7b": _opt("opt-6.7b", 4096, 32, 32, 16384, 51200),
        "gpt-20b": _opt("gpt-20b", 6144, 32, 44, 24576, 51200),
        "opt-30b": _opt("opt-30b", 7168, 56, 48, 28672, 50304),
    }
    for name, config in _HF_SHAPES.items():
        models[name] = ModelSpec.from_hf_config(config, name=name)
    return models


ALIASES = {"6.7b": "opt-6.7b", "20b": "gpt-20b", "30b": "opt-30b"}


def resolve_model(name_or_path: str, dtype: str | None = None) -> ModelSpec:
    """A built-in name (case-insensitive; aliases 6.7b/20b/30b), or a HF config.json or
    its folder."""
    models = builtin_models()
    key = ALIASES.get(name_or_path.lower(), name_or_path.lower())
    if key in models:
        spec = models[key]
        return spec.with_dtype(dtype) if dtype else spec
    path = Path(name_or_path)
    if path.exists() or "/" in name_or_path or name_or_path.endswith(".json"):
        return ModelSpec.from_hf_config(path, dtype=dtype)
    raise SpotserveError(f"unknown model {name_or_path!r}: not a built-in "
                         f"({', '.join(sorted(models))}) and no such file or folder")
