"""Was every token of a greedy request the model's choice given the tokens before it?

`python -m spotserve.worker.greedy_check --model DIR REQUESTS.jsonl` reads requests (JSON
lines with `id`, `prompt` and `tokens`), scores each one teacher-forced in a single
prefill of prompt + tokens on one process holding the whole model, and prints one JSON
line per request: `ok`, and where it is not, the first position whose token was not the
greedy choice and by how much its logit fell short of the best.

Why not compare with one reference run: on CPU (MKL) and GPU alike, a matrix product's
rounding depends on how many rows it holds, so the same prompt's fp32 logits move by
~1e-5 with the batch it shares a step with, and where the two best tokens are that close
greedy decoding may pick either. A run without preemption is then one valid output among
a few. What must hold whatever the batching, migrations and resumes: each committed token
is the greedy choice for exactly the committed prefix before it, up to such a near tie
(`--tolerance`, 1e-3 for fp32 outputs: ~100 times the batch noise, far below the top-two gap
of ~99.8% of positions of the tiny test model). A KV cache moved wrongly, a token lost
or repeated across a resume, or a stage with the wrong weights all break that at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from spotserve.worker.engine.engine import Engine, EngineConfig
from spotserve.worker.engine.sequence import SamplingParams
from spotserve.worker.engine.sequence import Sequence as Seq
from spotserve.worker.model.attention import AttentionBatch, SequenceChunk

TOLERANCE = 1e-3
# The near tie of each dtype the outputs were served in, checked against fp32 logits: fp32
# batch noise is ~1e-5 (see above); half precision rounds activations at every layer, and
# two valid bf16 runs (another batch, another GPU kernel, another TP degree) part by
# ~1e-2 to 1e-1 of a logit (measured: bench/gpu/promise.py, docs/gpu.md)
TOLERANCES = {"float32": TOLERANCE, "float16": 0.1, "bfloat16": 0.5}


def tolerance_for(dtype: str) -> float:
    """The near tie to allow for outputs served in `dtype`."""
    return TOLERANCES.get(dtype, TOLERANCE)


@dataclass(frozen=True)
class Check:
    ok: bool
    position: int = -1      # the first generated token that was not a greedy choice
    shortfall: float = 0.0  # best logit there minus that token's logit


@torch.inference_mode()
def shortfalls(engine: Engine, prompt: Sequence[int], tokens: Sequence[int]) -> list[float]:
    """Per generated token: the best logit minus its logit, given the prompt and every
    token before it (teacher-forced; 0 where it was the greedy choice)."""
    if not tokens:
        return []
    runner, ids = engine.runner, [*prompt, *tokens[:-1]]
    seq = Seq("check", list(ids), SamplingParams())
    engine.blocks.grow(seq, len(ids))
    try:
        batch = AttentionBatch.build([SequenceChunk(len(ids), len(ids), seq.block_table)],
                                     runner.cache.block_size, runner.model.device,
                                     runner.model.sliding_window)
        hidden = runner.model(torch.tensor(ids, device=runner.model.device), batch,
                              runner.cache.layers)
        rows = torch.arange(len(prompt) - 1, len(ids), device=hidden.device)
        logits = runner.model.compute_logits(hidden[rows])
    finally:
        engine.blocks.free(seq)
    chosen = logits.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]
    return (logits.max(dim=1).values - chosen).tolist()


def check(engine: Engine, prompt: Sequence[int], tokens: Sequence[int],
          tolerance: float = TOLERANCE) -> Check:
    for position, short in enumerate(shortfalls(engine, prompt, tokens)):
        if short > tolerance:
            return Check(False, position, short)
    return Check(True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spotserve.worker.greedy_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("requests", type=Path, help="JSON lines: id, prompt, tokens")
    parser.add_argument("--model", type=Path, required=True, help="HF model folder")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest logit shortfall taken as a tie (default: by the "
                        "model's dtype, " + ", ".join(f"{k} {v:g}" for k, v in
                                                      TOLERANCES.items()) + ")")
    args = parser.parse_args(argv)
    from spotserve.worker.engine.builder import local_engine

    torch.set_num_threads(1)
    lines = [json.loads(line) for line in args.requests.read_text().splitlines() if line]
    longest = max((len(r["prompt"]) + len(r["tokens"]) for r in lines), default=1)
    block = 16
    engine = local_engine(args.model, EngineConfig(num_blocks=-(-longest // block) + 1,
                                                   block_size=block))
    tolerance = args.tolerance
    if tolerance is None:
        tolerance = tolerance_for(engine.runner.model.spec.dtype)
    for r in lines:
        result = check(engine, r["prompt"], r["tokens"], tolerance)
        print(json.dumps({"id": r["id"], **vars(result)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
