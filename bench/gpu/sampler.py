"""The batched sampler against the per-row one it replaced (commit 68e5ae6), same logits.

    python bench/gpu/sampler.py               # on CUDA when there is one, else the CPU
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from spotserve.worker.engine import sampling as new
from spotserve.worker.engine.sequence import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
PREVIOUS = "68e5ae6"


def previous_sampler(folder: Path):  # type: ignore[no-untyped-def]
    source = subprocess.run(["git", "show", f"{PREVIOUS}:worker/engine/sampling.py"],
                            cwd=ROOT, check=True, capture_output=True, text=True).stdout
    path = folder / "sampling_previous.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("sampling_previous", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = 128256 if device == "cuda" else 49152
    with tempfile.TemporaryDirectory() as tmp:
        old = previous_sampler(Path(tmp))
        for label, extra in (("top_k=50,top_p=0.9", {"top_k": 50, "top_p": 0.9}),
                             ("top_p=0.95", {"top_p": 0.95})):
            for rows in (1, 16, 64):
                logits = torch.randn(rows, vocab, device=device)
                params = [SamplingParams(temperature=0.8, seed=i, **extra) for i in range(rows)]
                positions = list(range(rows))
                took = {}
                for name, module in (("old", old), ("new", new)):
                    for _ in range(3):
                        module.sample(logits, params, positions)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(10):
                        module.sample(logits, params, positions)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    took[name] = (time.perf_counter() - start) / 10
                print(f"{device} vocab {vocab} {label:20s} batch {rows:3d}: old "
                      f"{took['old'] * 1e3:8.2f} ms  new {took['new'] * 1e3:7.2f} ms  "
                      f"({took['old'] / took['new']:.1f}x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
