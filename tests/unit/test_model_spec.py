"""ModelSpec: tensor names, shapes and sizes agree with Hugging Face's own model classes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from spotserve.errors import SpotserveError
from spotserve.model_spec import ModelSpec, Split
from spotserve.models import builtin_models, resolve_model

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 211,
        "max_position_embeddings": 128}

FAMILIES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {},
    "Qwen3ForCausalLM": {"head_dim": 16},
    "GemmaForCausalLM": {"head_dim": 16},
}


def _hf_shapes(arch: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    import torch
    import transformers

    cfg_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    with torch.device("meta"):
        model = getattr(transformers, arch)(cfg_cls(**config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not k.endswith("rotary_emb.inv_freq")}


@pytest.mark.parametrize("arch", sorted(FAMILIES))
@pytest.mark.parametrize("tied", [False, True])
def test_tensors_match_transformers(arch: str, tied: bool) -> None:
    pytest.importorskip("transformers")
    config = {**TINY, **FAMILIES[arch], "architectures": [arch], "tie_word_embeddings": tied}
    spec = ModelSpec.from_hf_config(config)
    expected = _hf_shapes(arch, config)
    if tied:
        expected.pop("lm_head.weight", None)
    assert {t.name: t.shape for t in spec.tensors()} == expected
    assert spec.num_parameters == sum(__import__("math").prod(s) for s in expected.values())


def test_split_rules_keep_whole_heads() -> None:
    spec = ModelSpec.from_hf_config({**TINY, "architectures": ["Qwen2ForCausalLM"]})
    q = spec.tensor("model.layers.0.self_attn.q_proj.weight")
    k_bias = spec.tensor("model.layers.0.self_attn.k_proj.bias")
    o = spec.tensor("model.layers.0.self_attn.o_proj.weight")
    assert (q.split, q.unit, q.units) == (Split.COLUMN, 8, 8)
    assert (k_bias.split, k_bias.kv, k_bias.units) == (Split.COLUMN, True, 2)
    assert (o.split, o.split.dim) == (Split.ROW, 1)
    assert spec.tensor("model.embed_tokens.weight").split is Split.VOCAB
    assert spec.supports_tp(4) and spec.supports_tp(8) and not spec.supports_tp(3)


def test_builtin_sizes_match_published_figures() -> None:
    models = builtin_models()
    # published parameter counts
    assert round(models["llama-3.1-8b"].num_parameters / 1e9, 2) == 8.03
    assert round(models["llama-3.1-70b"].num_parameters / 1e9, 2) == 70.55
    assert round(models["qwen3-32b"].num_parameters / 1e9, 2) == 32.76
    # Llama 3.1 8B: 32 layers x 8 KV heads x 128 x 2 (K and V) x 2 bytes = 128 KiB per token
    assert models["llama-3.1-8b"].kv_bytes_per_token == 128 * 1024
    # the paper's models, fp32
    assert models["opt-6.7b"].dtype == "float32"
    assert 6.5e9 < models["opt-6.7b"].num_parameters < 6.9e9
    assert 19.5e9 < models["gpt-20b"].num_parameters < 20.5e9
    assert 29.5e9 < models["opt-30b"].num_parameters < 30.5e9


def test_resolve_by_alias_path_and_dtype(tmp_path: Path) -> None:
    assert resolve_model("20B").name == "gpt-20b"
    assert resolve_model("llama-3.1-8b", "fp32").dtype == "float32"
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "architectures":
                                                      ["MistralForCausalLM"]}))
    spec = resolve_model(str(tmp_path))
    assert (spec.family, spec.name, spec.num_layers) == ("mistral", tmp_path.name, 3)


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"),
    ("{not json", "malformed JSON at line 1"),
    ('["a list"]', "expected a JSON object"),
    ('{"architectures": ["GPT2LMHeadModel"]}', "unsupported architecture"),
    (json.dumps({**TINY, "architectures": ["LlamaForCausalLM"], "hidden_size": "big"}),
     "hidden_size must be a positive integer"),
    (json.dumps({**TINY, "architectures": ["LlamaForCausalLM"], "num_attention_heads": 0}),
     r"num_attention_heads must be a positive integer \(got 0\)"),
    (json.dumps({**TINY, "architectures": ["LlamaForCausalLM"], "num_key_value_heads": 3}),
     "not a multiple"),
    (json.dumps({**TINY, "architectures": ["LlamaForCausalLM"], "torch_dtype": "int4"}),
     "unsupported dtype"),
    (json.dumps({**TINY, "architectures": ["LlamaForCausalLM"], "hidden_act": "relu2"}),
     r"activation 'relu2' is not one the engine runs"),
])
def test_bad_configs_give_clear_errors(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SpotserveError, match=message):
        ModelSpec.from_hf_config(path)


def test_gemma_takes_its_activation_from_hidden_activation() -> None:
    """Gemma's hidden_act is an old key transformers ignores: GELU (tanh) unless
    hidden_activation says otherwise; Llama's hidden_act is read as it is. Gemma's
    embeddings are tied unless its config says not."""
    gemma = {**TINY, "architectures": ["GemmaForCausalLM"], "hidden_act": "gelu"}
    spec = ModelSpec.from_hf_config(gemma)
    assert (spec.family, spec.hidden_act, spec.gemma_style) == (
        "gemma", "gelu_pytorch_tanh", True)
    # Google's configs leave tie_word_embeddings out; Gemma's default ties them
    assert spec.tie_word_embeddings and "lm_head.weight" not in {t.name for t in spec.tensors()}
    assert ModelSpec.from_hf_config({**gemma, "hidden_activation": "gelu"}).hidden_act == "gelu"
    llama = ModelSpec.from_hf_config({**TINY, "architectures": ["LlamaForCausalLM"]})
    assert (llama.hidden_act, llama.gemma_style) == ("silu", False)
