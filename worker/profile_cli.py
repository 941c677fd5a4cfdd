"""`spotserve profile`: measure per-layer latency on this device and write the profile JSON
the planner's cost model reads (the SpotServe artifact's format)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spotserve.errors import SpotserveError

HELP = "measure per-layer prefill/decode latency on this device; write a planner profile"


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("values must be positive integers")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="HF model folder (config.json is enough) or a built-in name")
    parser.add_argument("--tp", type=_ints, default=(1, 2, 4), help="TP degrees (1,2,4)")
    parser.add_argument("--batch", type=_ints, default=(1, 2, 4, 8), help="batches (1,2,4,8)")
    parser.add_argument("--seq-in", type=int, default=512, help="prompt length (512)")
    parser.add_argument("--layers", type=int, default=2, help="layers timed together (2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, median (3)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if "
                        "available, else cpu)")
    parser.add_argument("--dtype", default=None,
                        help="float32/bfloat16/float16 (default: the model's; fp32 on CPU)")
    parser.add_argument("--out", default=None, help="write the JSON here (default: stdout)")


def run(args: argparse.Namespace) -> int:
    import torch

    from spotserve.models import resolve_model
    from spotserve.worker.profiler import ProfileSettings, profile
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SpotserveError("--device cuda asked for, but no CUDA device is available")
    dtype = args.dtype or ("float32" if device == "cpu" else None)
    spec = resolve_model(args.model, dtype=dtype)
    if not spec.is_llama_family:
        raise SpotserveError(f"{spec.name}: the engine runs Llama-family models only")
    if args.seq_in < 1 or args.layers < 1 or args.repeats < 1:
        raise SpotserveError("--seq-in, --layers and --repeats must be positive")
    settings = ProfileSettings(tp_degrees=args.tp, batches=args.batch, seq_in=args.seq_in,
                               layers=args.layers, repeats=args.repeats, device=device)
    if not any(spec.supports_tp(tp) for tp in settings.tp_degrees):
        raise SpotserveError(f"none of TP {args.tp} divides {spec.name}'s heads")
    result = profile(spec, settings, progress=lambda line: print(line, file=sys.stderr))
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
