"""Tiny random Llama-family checkpoints, built with `transformers` and saved as sharded
HF safetensors so the engine's real loader reads them.

Weights are drawn with a larger spread than HF's default init, so greedy decoding has wide
argmax margins: a change of float summation order (tensor parallelism) cannot flip a token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
    "llama31": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 32},
                "rope_theta": 500000.0},
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                "sliding_window": None},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
              "tie_word_embeddings": True},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 16},
    "gemma": {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "head_dim": 24,
              "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh"},
}

BASE: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 131,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "eos_token_id": 2, "bos_token_id": 1, "torch_dtype": "float32",
}


def hf_config(family: str, **overrides: Any) -> Any:
    import transformers
    values = {**BASE, **FAMILIES[family], **overrides}
    model_type = values.pop("model_type")
    values.pop("architectures")
    config = transformers.AutoConfig.for_model(model_type, **values)
    config.architectures = list(FAMILIES[family]["architectures"])
    return config


def build_hf_model(family: str, seed: int = 0, std: float = 0.15, **overrides: Any) -> Any:
    """A random `transformers` model (fp32, eval mode)."""
    import transformers
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides),
                                                          torch_dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(std * torch.randn(param.shape, generator=generator))
    return model.eval()


def save_tiny(folder: Path, family: str = "llama", seed: int = 0, shard: str = "40KB",
              **overrides: Any) -> Path:
    """Save a tiny random model (sharded safetensors) under `folder`; return the folder."""
    model = build_hf_model(family, seed, **overrides)
    model.save_pretrained(folder, max_shard_size=shard, safe_serialization=True)
    return folder
