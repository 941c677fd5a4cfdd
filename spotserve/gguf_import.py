"""`spotserve import-gguf FILE --to DIR`: a GGUF checkpoint as a model folder the engine
serves: sharded safetensors, config.json, tokenizer.json, tokenizer_config.json and the
chat template, all from the GGUF file (no `transformers`).

Weights are dequantized with the `gguf` package's own dequantizers (every quant type it
knows) and written in the dtype asked for. llama.cpp stores Llama's q and k projections
with the rows of each head interleaved for its rotary kernel; they are put back in the
Hugging Face order. The tokenizer is rebuilt with `tokenizers` from the GGUF vocabulary:
byte-level BPE (`tokenizer.ggml.model` gpt2) only, which is what Llama-3-, SmolLM- and
Qwen-style GGUFs carry; SentencePiece-style ones (`llama`) are refused, saying so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from spotserve.errors import SpotserveError

HELP = "turn a GGUF checkpoint (llama architecture) into a model folder the engine serves"
ARCHITECTURES = ("llama",)
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": None}
SHARD_BYTES = 2 << 30
# GGUF tensor name (after "blk.N.") → the Hugging Face name's suffix
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
CONTROL = 3   # tokenizer.ggml.token_type of special (control) tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="the .gguf file")
    parser.add_argument("--to", type=Path, required=True, metavar="DIR",
                        help="the model folder to write (created; must be empty if it exists)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the written weights (float32)")


def run(args: argparse.Namespace) -> int:
    try:
        written = import_gguf(args.file, args.to, args.dtype,
                              progress=lambda text: print(text, file=sys.stderr, flush=True))
    except SpotserveError as exc:
        print(f"spotserve import-gguf: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


def _reader(path: Path) -> Any:
    try:
        import gguf
    except ModuleNotFoundError:
        raise SpotserveError("needs the gguf package: pip install gguf") from None
    if not path.is_file():
        raise SpotserveError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise SpotserveError(f"{path}: not a readable GGUF file ({exc or type(exc).__name__})"
                             ) from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise SpotserveError(f"the GGUF file has no {key}")
        return default
    return field.contents()


def import_gguf(path: Path, dest: Path, dtype: str = "float32",
                progress: Any = None) -> Path:
    """Write the model folder for GGUF `path` into `dest`; returns `dest`."""
    say = progress or (lambda text: None)
    reader = _reader(path)
    arch = str(_field(reader, "general.architecture"))
    if arch not in ARCHITECTURES:
        raise SpotserveError(f"{path}: unsupported architecture {arch!r} (supported: "
                             f"{', '.join(ARCHITECTURES)})")
    if dest.exists() and any(dest.iterdir()):
        raise SpotserveError(f"{dest}: exists and is not empty")
    config = _config(reader, arch, dtype)
    tokenizer, special = _tokenizer(reader)
    dest.mkdir(parents=True, exist_ok=True)
    tensors = _tensors(reader, config, dtype, say)
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    _write_shards(tensors, dest, dtype)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(str(dest / "tokenizer.json"))
    template = reader.fields.get("tokenizer.chat_template")
    tok_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                  "model_max_length": config["max_position_embeddings"],
                                  **special}
    if template is not None:
        (dest / "chat_template.jinja").write_text(str(template.contents()))
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    say(f"import-gguf: {len(tensors)} tensors, {config['num_hidden_layers']} layers → {dest}")
    return dest


def _config(reader: Any, arch: str, dtype: str) -> dict[str, Any]:
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens", [])
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, f"{arch}.rope.dimension_count", hidden // heads)),
        "vocab_size": int(_field(reader, f"{arch}.vocab_size", len(tokens) or 0)) or len(tokens),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length")),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "torch_dtype": dtype,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
    }
    if not config["vocab_size"]:
        raise SpotserveError("the GGUF file gives no vocabulary size")
    return config


def _tensors(reader: Any, config: dict[str, Any], dtype: str, say: Any
             ) -> dict[str, np.ndarray]:
    from gguf import quants

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(reader.tensors):
        name = _hf_name(tensor.name)
        if name is None:
            continue    # rope frequency tables and the like: the engine computes its own
        try:
            data = quants.dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError, KeyError) as exc:
            raise SpotserveError(f"{tensor.name}: quant type {tensor.tensor_type.name} cannot "
                                 f"be dequantized ({exc})") from None
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        data = np.asarray(data, dtype=np.float32).reshape(shape)
        if name.endswith("q_proj.weight"):
            data = _unpermute(data, heads)
        elif name.endswith("k_proj.weight"):
            data = _unpermute(data, kv_heads)
        out[name] = data
        if i % 50 == 0:
            say(f"import-gguf: {i + 1}/{len(reader.tensors)} tensors")
    return out


def _hf_name(name: str) -> str | None:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    if name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        if rest in LAYER_NAMES:
            return f"model.layers.{layer}.{LAYER_NAMES[rest]}"
    return None


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary order of a q/k projection back to Hugging Face's: within each
    head, llama.cpp interleaves the two rotated halves row by row."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def _write_shards(tensors: dict[str, np.ndarray], dest: Path, dtype: str) -> None:
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, data in tensors.items():
        data = _cast(data, dtype)
        if size and size + data.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = data
        size += data.nbytes
    if len(shards) == 1:
        _save(save_file, shards[0], dest / "model.safetensors", dtype)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save(save_file, shard, dest / file, dtype)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _cast(data: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":   # numpy has no bf16: the top half of each float32, rounded
        bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        return (rounded >> 16).astype(np.uint16)
    return np.ascontiguousarray(data, dtype=DTYPES[dtype])


def _save(save_file: Any, shard: dict[str, np.ndarray], path: Path, dtype: str) -> None:
    if dtype != "bfloat16":
        save_file(shard, str(path), metadata={"format": "pt"})
        return
    # safetensors' numpy API has no bf16: write the header ourselves (the format is a
    # little-endian u64 header length, a JSON header, then the raw bytes)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, data in shard.items():
        header[name] = {"dtype": "BF16", "shape": list(data.shape),
                        "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for data in shard.values():
            f.write(data.tobytes())


def _tokenizer(reader: Any) -> tuple[Any, dict[str, str]]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = str(_field(reader, "tokenizer.ggml.model"))
    if kind != "gpt2":
        raise SpotserveError(f"tokenizer type {kind!r} is not supported (byte-level BPE, "
                             "'gpt2', is)")
    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    merges: list[tuple[str, str]] = []
    for merge in _field(reader, "tokenizer.ggml.merges"):
        left, _, right = str(merge).partition(" ")
        merges.append((left, right))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                     byte_fallback=False))
    pre = str(_field(reader, "tokenizer.ggml.pre", "default"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):   # digits one by one, then GPT-2's split
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind_ in zip(tokens, types, strict=True)
                                  if kind_ == CONTROL])
    special = {}
    for key in ("bos", "eos", "unknown", "padding"):
        index = reader.fields.get(f"tokenizer.ggml.{key}_token_id")
        if index is not None:
            name = {"unknown": "unk_token", "padding": "pad_token"}.get(key, f"{key}_token")
            special[name] = tokens[int(index.contents())]
    return tokenizer, special
