"""A tiny random Llama for local mode: `config.json`, `model.safetensors` and a word-level
`tokenizer.json`, written with numpy alone (the operator never imports torch).

Weights are drawn with a wide spread (std 0.15, norms near 1) so greedy decoding has wide
argmax margins: a different float summation order (tensor or pipeline parallelism) cannot
flip a token, which is what lets the demo check outputs against a reference run.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 160
CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "torch_dtype": "float32",
}


def word(token_id: int) -> str:
    """The tokenizer's word for `token_id` (prompts of the demo are made of these)."""
    return f"w{token_id}"


def _shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"],
                                                                       hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (hidden,),
                    p + "self_attn.q_proj.weight": (q, hidden),
                    p + "self_attn.k_proj.weight": (kv, hidden),
                    p + "self_attn.v_proj.weight": (kv, hidden),
                    p + "self_attn.o_proj.weight": (hidden, q),
                    p + "post_attention_layernorm.weight": (hidden,),
                    p + "mlp.gate_proj.weight": (inter, hidden),
                    p + "mlp.up_proj.weight": (inter, hidden),
                    p + "mlp.down_proj.weight": (hidden, inter)})
    out["model.norm.weight"] = (hidden,)
    out["lm_head.weight"] = (config["vocab_size"], hidden)
    return out


def random_weights(config: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in _shapes(config).items():
        if name.endswith("norm.weight"):
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.15 * rng.standard_normal(shape)).astype(np.float32)
    return out


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors format: u64 header length, JSON header, then the raw bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset, blobs = 0, []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for blob in blobs:
            out.write(blob)


# Chat: each turn is its role's marker word and its text; the assistant's marker opens
# the reply. Words outside the vocabulary read as w0, as any unknown word does.
ROLE_WORDS = {"system": word(3), "user": word(4), "assistant": word(5)}
CHAT_TEMPLATE = (
    "{{ bos_token }} {% for m in messages %}"
    "{{ " + repr(ROLE_WORDS) + ".get(m['role'], '" + ROLE_WORDS["user"] + "') }} "
    "{{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}" + ROLE_WORDS["assistant"] + "{% endif %}")


def write_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer whose BOS (w1) and EOS (w2) are special tokens (left out of
    decoded text), with a chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({word(i): i for i in range(vocab)},
                                           unk_token=word(0)))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.add_special_tokens([AddedToken(word(i), special=True, single_word=True)
                                  for i in (1, 2)])  # w1, not the w1 of w10
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": word(1), "eos_token": word(2), "chat_template": CHAT_TEMPLATE}))


def is_tiny_llama(folder: Path) -> bool:
    """Whether `folder` holds the tiny random Llama (built on its defaults): its words are
    no language, so it is sent random prompts rather than questions."""
    try:
        return bool(json.loads((folder / "config.json").read_text()) == CONFIG)
    except (OSError, ValueError):
        return False


def build_tiny_llama(folder: Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random Llama under `folder` (created); return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {**CONFIG, **overrides}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    write_safetensors(folder / "model.safetensors", random_weights(config, seed))
    write_tokenizer(folder, config["vocab_size"])
    return folder
