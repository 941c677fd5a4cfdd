"""Benchmark: what one decode step costs in launches, host-built tensors and host syncs.

A decode step's time on a GPU at small batch is mostly launch overhead and host round trips,
not math. This counts, for one steady-state decode step of our engine (every sequence past
its prompt, the batch full):

- `ops`: aten operations dispatched that compute (views, no-op casts and other results that
  alias an input are left out; in-place ops count): on CPU the stand-in for kernel launches,
  each being one launch or more on a GPU;
- `host_tensors`: tensors built from host data (`torch.tensor(...)`), each of which a GPU
  step uploads;
- `syncs` (CUDA only: on a CPU nothing waits): operations on device tensors that make the
  host wait (`item`, `nonzero`, a copy to the host);
- on CUDA also, from the torch profiler: `kernels` launched, `memcpy` calls (either way)
  and explicit `stream_syncs`.

Counts do not depend on the machine, so the CPU test `tests/engine/test_launches.py` keeps
them from growing. Run it against another tree to compare (the "before" figures):

    python bench/engine/launches.py                       # CPU, tiny shapes
    python bench/engine/launches.py --device cuda --shape llama-8b --layers 4 --batches 1,16,64
    PYTHONPATH=/path/to/old/assembled/tree python bench/engine/launches.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as engine_bench

# aten ops that wait for the device: a scalar read, a data-dependent size, a copy to host
SYNC_OPS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.nonzero.default",
            "aten.masked_select.default", "aten.unique.default", "aten._unique2.default"}
HOST_BUILT = {"aten.lift_fresh.default"}
METADATA = {"aten.detach_.default"}   # in place, but on the tensor's metadata alone


class OpCounter(TorchDispatchMode):
    """Counts aten ops as they are dispatched (after composite ops are decomposed)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()     # computing ops by name
        self.host_built = self.syncs = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        name = str(func)
        out = func(*args, **kwargs)
        inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        on_device = any(t.device.type not in ("cpu", "meta") for t in inputs)
        if name in HOST_BUILT:
            self.host_built += 1
        elif name in SYNC_OPS and on_device:
            self.syncs += 1
        elif name in ("aten._to_copy.default", "aten.copy_.default") and on_device and \
                any(t.device.type == "cpu" for t in _tensors(out) + inputs[:1]):
            self.syncs += name == "aten._to_copy.default" or inputs[0].device.type == "cpu"
        if name not in METADATA and _computes(func, inputs, out):
            self.ops[name] += 1
        return out

    def summary(self) -> dict[str, int]:
        return {"ops": sum(self.ops.values()), "host_tensors": self.host_built,
                "syncs": self.syncs}


def _tensors(value: Any) -> list[torch.Tensor]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return [t for t in items if isinstance(t, torch.Tensor)]


def _computes(func: Any, inputs: list[torch.Tensor], out: Any) -> bool:
    """In-place and out= ops compute; otherwise an op computes unless its result aliases
    an input (a view, a no-op cast)."""
    schema = func._schema
    if any(a.is_out or (a.alias_info is not None and a.alias_info.is_write)
           for a in schema.arguments):
        return True
    held = {t.untyped_storage().data_ptr() for t in inputs if t.device.type != "meta"}
    outs = _tensors(out)
    return bool(outs) and not all(t.untyped_storage().data_ptr() in held for t in outs)


def decode_engine(folder: Path, batch: int, in_len: int, dtype: str, device: str,
                  cuda_graphs: bool = False) -> Any:
    """An engine with `batch` requests, each past its prompt and decoding."""
    from spotserve.worker.engine.sequence import SamplingParams
    extra = {"cuda_graphs": True} if cuda_graphs else {}   # (an older tree lacks the flag)
    runner = engine_bench.EngineRunner(folder, dtype, device, batch, in_len, 64, **extra)
    engine = runner.engine
    generator = torch.Generator().manual_seed(0)
    vocab = engine_bench.MODEL["vocab_size"]
    for i in range(batch):
        prompt = torch.randint(3, vocab, (in_len,), generator=generator).tolist()
        engine.submit(f"r{i}", prompt, SamplingParams(max_tokens=64, ignore_eos=True))
    started: set[str] = set()
    while len(started) < batch:
        started |= {e.request_id for e in engine.step()}
    for _ in range(2):   # warm: the first decode steps allocate
        engine.step()
    return engine


def count_step(engine: Any, device: str) -> dict[str, int]:
    """The counts of one decode step of `engine` (which must be decoding)."""
    counter = OpCounter()
    with counter:
        engine.step()
    counts = counter.summary()
    if device.startswith("cuda"):
        counts.update(_cuda_counts(engine))
    return counts


def _cuda_counts(engine: Any) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    names = Counter(e.name for e in prof.events())
    launches = sum(n for name, n in names.items()
                   if name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                               "cuLaunchKernelEx", "cudaGraphLaunch"))
    return {"kernels": launches,
            "memcpy": sum(n for name, n in names.items() if name.startswith("cudaMemcpy")),
            "stream_syncs": sum(n for name, n in names.items()
                                if name in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                            "cudaEventSynchronize")) - 1}   # ours, above


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--shape", choices=sorted(engine_bench.SHAPES), default="small")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (2)")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--in-len", type=int, default=32)
    p.add_argument("--label", default="", help="a name for this tree in the output")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also count the decode step replayed from a CUDA graph")
    p.add_argument("--out", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    engine_bench.MODEL.update({**engine_bench.SHAPES[args.shape],
                               "num_hidden_layers": args.layers})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        engine_bench.save_model(Path(tmp))
        for batch in [int(b) for b in args.batches.split(",")]:
            for graphs in [False, True] if args.cuda_graphs else [False]:
                engine = decode_engine(Path(tmp), batch, args.in_len, dtype, args.device,
                                       graphs)
                row = {"label": args.label + ("+graphs" if graphs else ""),
                       "device": args.device, "shape": args.shape, "layers": args.layers,
                       "dtype": dtype, "batch": batch, **count_step(engine, args.device)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                del engine
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
