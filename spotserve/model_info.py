"""`spotserve model-info`: print a model's shape, sizes and minimum GPUs per GPU type."""

from __future__ import annotations

import argparse
import json

from spotserve.catalog import Catalog
from spotserve.memory import USABLE_FRACTION, min_gpus
from spotserve.model_spec import ModelSpec
from spotserve.models import resolve_model

HELP = "Print a model's parameters, bytes, KV cache per token and minimum GPUs per GPU type."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="built-in name (opt-6.7b, gpt-20b, opt-30b, llama-3.1-8b, "
                        "llama-3.1-70b, qwen3-32b) or a HF config.json / model folder")
    parser.add_argument("--dtype", help="override the weight dtype (float32, float16, bfloat16)")
    parser.add_argument("--context", type=int, default=4096, metavar="TOKENS",
                        help="KV cache tokens to reserve when counting minimum GPUs "
                             "(default: %(default)s)")
    parser.add_argument("--catalog", help="YAML file extending the built-in GPU catalog")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def summary(model: ModelSpec, catalog: Catalog, context: int) -> dict[str, object]:
    info: dict[str, object] = dict(model.to_dict())
    info["min_gpus"] = {name: min_gpus(model, gpu, context) for name, gpu in catalog.gpus.items()}
    info["context_reserved_tokens"] = context
    return info


def run(args: argparse.Namespace) -> int:
    if args.context < 0:
        from spotserve.errors import SpotserveError
        raise SpotserveError("--context must be zero or positive")
    model = resolve_model(args.model, args.dtype)
    info = summary(model, Catalog.load(args.catalog), args.context)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    heads = f"{model.num_heads} heads ({model.num_kv_heads} KV) x {model.head_dim}"
    print(f"{model.name}  [{model.family}, {model.dtype}]")
    print(f"  layers {model.num_layers}, hidden {model.hidden_size}, "
          f"intermediate {model.intermediate_size}, {heads}, vocab {model.vocab_size}")
    print(f"  parameters       {model.num_parameters / 1e9:.2f} B")
    print(f"  weights          {_gib(model.weight_bytes)}  "
          f"({_gib(model.weight_bytes_per_layer)} per layer)")
    print(f"  KV per token     {model.kv_bytes_per_token / 2**10:.1f} KiB "
          f"({model.kv_bytes_per_token_per_layer} B per layer)")
    tps = [tp for tp in (1, 2, 4, 8, 16) if model.supports_tp(tp)]
    print(f"  TP degrees       {', '.join(map(str, tps))}")
    print(f"  minimum GPUs (weights + KV of {args.context} tokens, "
          f"{int(USABLE_FRACTION * 100)}% of memory usable):")
    for name, count in info["min_gpus"].items():  # type: ignore[attr-defined]
        print(f"    {name:<10} {count}")
    return 0
