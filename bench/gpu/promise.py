"""How far two valid half-precision runs of the same tokens part, in logits (docs/gpu.md).

The output promise on GPUs rests on a number: in bf16 (or fp16) the logits of the same
prefix move with the batch around it, the kernels chosen and the TP degree, so a greedy
choice between two tokens closer than that may go either way. This measures it, on
random Llama weights of the bench's shapes: teacher-forced logits of a few prompts

- in fp32 (the reference), all prompts in one step;
- in the half dtype, all prompts in one step, and each prompt alone;

and prints, per dtype, the largest and 99.9th-percentile |logit difference| of half vs
fp32 and of half-batched vs half-alone, with the logits' scale, and how often the greedy
choice agrees. `spotserve.worker.greedy_check.TOLERANCES` is set well above these.

    python bench/gpu/promise.py --device cuda [--shape llama-8b --layers 4]
    python bench/gpu/promise.py --device cpu --dtypes bfloat16    # small, anywhere
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
import run as engine_bench  # bench/engine/run.py: model shapes and saving


def logits_of(folder: Path, dtype: str, device: str, prompts: list[list[int]],
              together: bool) -> list[torch.Tensor]:
    """Teacher-forced fp32 logits [len, vocab] of each prompt, on the CPU."""
    from spotserve.worker.engine.builder import local_engine
    from spotserve.worker.engine.engine import EngineConfig
    from spotserve.worker.model.attention import AttentionBatch, SequenceChunk
    block = 16
    per = max(-(-len(p) // block) for p in prompts)
    engine = local_engine(folder, EngineConfig(num_blocks=per * len(prompts), block_size=block),
                          dtype=dtype, device=device)
    model, cache = engine.runner.model, engine.runner.cache
    groups = [list(range(len(prompts)))] if together else [[i] for i in range(len(prompts))]
    out: dict[int, torch.Tensor] = {}
    for group in groups:
        chunks = [SequenceChunk(len(prompts[i]), len(prompts[i]),
                                range(i * per, (i + 1) * per)) for i in group]
        ids = [t for i in group for t in prompts[i]]
        batch = AttentionBatch.build(chunks, block, model.device, token_ids=ids)
        with torch.inference_mode():
            assert batch.token_ids is not None
            logits = model.compute_logits(model(batch.token_ids, batch, cache.layers)).cpu()
        start = 0
        for i in group:
            out[i] = logits[start:start + len(prompts[i])]
            start += len(prompts[i])
    del engine, model, cache
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return [out[i] for i in range(len(prompts))]


def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, float]:
    diff = torch.cat([(x - y).abs().flatten() for x, y in zip(a, b, strict=True)])
    agree = torch.cat([x.argmax(-1) == y.argmax(-1) for x, y in zip(a, b, strict=True)])
    k = max(1, int(0.999 * diff.numel()))
    return {"max": float(diff.max()), "p99.9": float(diff.kthvalue(k).values),
            "greedy_agreement": float(agree.float().mean())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", default="bfloat16,float16")
    p.add_argument("--shape", choices=sorted(engine_bench.SHAPES), default="small")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--length", type=int, default=96)
    p.add_argument("--out", default=None, help="also write the result to this JSON file")
    args = p.parse_args()
    engine_bench.MODEL.update({**engine_bench.SHAPES[args.shape],
                               "num_hidden_layers": args.layers})
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, engine_bench.MODEL["vocab_size"],
                             (args.length - 7 * i,), generator=gen).tolist()
               for i in range(args.prompts)]   # ragged lengths
    result: dict[str, Any] = {"shape": args.shape, "layers": args.layers,
                              "device": args.device, "prompts": args.prompts}
    with tempfile.TemporaryDirectory() as tmp:
        engine_bench.save_model(Path(tmp))
        reference = logits_of(Path(tmp), "float32", args.device, prompts, together=True)
        result["logit_scale"] = float(torch.cat(reference).abs().max())
        result["fp32_alone_vs_batched"] = compare(
            logits_of(Path(tmp), "float32", args.device, prompts, together=False), reference)
        for dtype in args.dtypes.split(","):
            batched = logits_of(Path(tmp), dtype, args.device, prompts, together=True)
            alone = logits_of(Path(tmp), dtype, args.device, prompts, together=False)
            result[dtype] = {"vs_fp32": compare(batched, reference),
                             "batched_vs_alone": compare(batched, alone)}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
