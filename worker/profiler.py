"""Measure per-layer prefill and decode latency on this device, in the profile format the
planner reads (the SpotServe artifact's `profiles/*.json`).

For each TP degree M and batch B, a stage of a few middle layers holding TP rank 0's slice
(the shapes `position_slices` gives) runs on this device: `init` is the milliseconds one
layer takes to prefill B prompts of `seq_in` tokens, `incr` one decode step of B sequences
at context `seq_in`. The TP all-reduces are not part of the compute time (one device
cannot run M ranks); `tp_comm` records that. `embed` is the embedding lookup plus LM head
for one token per sequence (batches 1, 2, 4, 8), and `pp_init_comm` / `pp_incr_comm` the
stage hand-off: a prompt's / a step's hidden states sent between two processes on this
machine. Weights are random: latency does not depend on their values.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from spotserve.layout import ParallelConfig, PipelineLayout, Position, StageLayout
from spotserve.model_spec import ModelSpec
from spotserve.worker.engine.kv_cache import KVCache
from spotserve.worker.model.attention import AttentionBatch, SequenceChunk
from spotserve.worker.model.decoder import StageModel

EMBED_BATCHES = (1, 2, 4, 8)
BLOCK = 16


@dataclass(frozen=True)
class ProfileSettings:
    tp_degrees: tuple[int, ...] = (1, 2, 4)
    batches: tuple[int, ...] = (1, 2, 4, 8)
    seq_in: int = 512
    layers: int = 2          # layers timed together (their mean is reported)
    repeats: int = 3
    device: str = "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(1e3 * (time.perf_counter() - start))
    return statistics.median(samples)


def _randomize(model: StageModel) -> StageModel:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            values = torch.randn(param.shape, generator=generator) * 0.02
            param.copy_(values.to(param.dtype) + (1.0 if param.dim() == 1 else 0.0))
    return model


def middle_stage(spec: ModelSpec, tp: int, layers: int, device: str) -> StageModel:
    """TP rank 0 of a stage of `layers` layers with neither embedding nor head (when the
    model has enough layers)."""
    n = spec.num_layers
    if n >= layers + 2:
        bounds = [(0, 1), (1, 1 + layers), (1 + layers, n)]
        stage = 1
    else:
        bounds, stage = [(0, n)], 0
    config = ParallelConfig((PipelineLayout(tuple(StageLayout(a, b, tp) for a, b in bounds)),))
    return _randomize(StageModel(spec, config, Position(0, stage, 0), device=device))


def layer_latency(model: StageModel, batch: int, seq_in: int, repeats: int
                  ) -> tuple[float, float]:
    """(prefill ms, decode-step ms) per layer for `batch` sequences of `seq_in` tokens."""
    blocks_per_seq = -(-(seq_in + 2) // BLOCK)
    cache = KVCache.for_stage(model, batch * blocks_per_seq, BLOCK)
    tables = [list(range(b * blocks_per_seq, (b + 1) * blocks_per_seq)) for b in range(batch)]
    hidden_size, device = model.spec.hidden_size, model.device
    prefill = AttentionBatch.build([SequenceChunk(seq_in, seq_in, t) for t in tables], BLOCK,
                                   device)
    decode = AttentionBatch.build([SequenceChunk(1, seq_in + 1, t) for t in tables], BLOCK,
                                  device)
    x_prefill = torch.randn(batch * seq_in, hidden_size, device=device).to(model.dtype)
    x_decode = torch.randn(batch, hidden_size, device=device).to(model.dtype)
    inputs = (lambda x: x) if not model.is_first else (lambda x: torch.zeros(
        x.shape[0], dtype=torch.long, device=device))
    with torch.inference_mode():
        init = _time_ms(lambda: model(inputs(x_prefill), prefill, cache.layers), device,
                        repeats)
        incr = _time_ms(lambda: model(inputs(x_decode), decode, cache.layers), device, repeats)
    layers = len(model.layer_range)
    return init / layers, incr / layers


def embed_latency(spec: ModelSpec, batches: Sequence[int], device: str, repeats: int
                  ) -> list[float]:
    """Embedding lookup + final norm + LM head, one token per sequence, TP 1."""
    config = ParallelConfig((PipelineLayout((StageLayout(0, 1, 1),)),))
    one_layer = replace(spec, num_layers=1, hf_config=spec.hf_config)
    model = _randomize(StageModel(one_layer, config, Position(0, 0, 0), device=device))
    norm = model.model.norm
    assert norm is not None

    def ends(ids: torch.Tensor) -> torch.Tensor:
        return model.compute_logits(norm(model.embed(ids)))

    out = []
    with torch.inference_mode():
        for batch in batches:
            ids = torch.randint(0, spec.vocab_size, (batch,), device=model.device)
            out.append(_time_ms(partial(ends, ids), model.device, repeats))
    return out


def profile(spec: ModelSpec, settings: ProfileSettings,
            progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The profile JSON object for `spec` on this device."""
    result: dict[str, Any] = {
        "name": f"{spec.name}_profile", "layer_num": spec.num_layers,
        "padded_layer_num": spec.num_layers, "final_fix_factor": 1.0,
        "hidden_size": spec.hidden_size,
        "max_tp": max(tp for tp in settings.tp_degrees if spec.supports_tp(tp)),
    }
    for tp in settings.tp_degrees:
        if not spec.supports_tp(tp):
            progress(f"skip TP={tp}: does not divide the heads")
            continue
        model = middle_stage(spec, tp, settings.layers, settings.device)
        entry = {}
        for batch in settings.batches:
            init, incr = layer_latency(model, batch, settings.seq_in, settings.repeats)
            entry[f"bsz-{batch}"] = {"init": round(init, 4), "incr": round(incr, 4)}
            progress(f"TP={tp} batch={batch}: prefill {init:.3f} ms/layer, "
                     f"decode {incr:.3f} ms/layer")
        result[f"tp-{tp}"] = entry
        del model
    result["embed"] = [round(x, 4) for x in embed_latency(spec, EMBED_BATCHES,
                                                          settings.device, settings.repeats)]
    batch = max(settings.batches)
    result["pp_init_comm"], result["pp_incr_comm"] = handoff_latency(
        spec, batch * settings.seq_in, batch, settings.repeats)
    result["tp_comm"] = "excluded: per-layer times are TP rank 0's compute on one device"
    result["device"] = _device_name(settings.device)
    result["dtype"], result["seq_in"] = spec.dtype, settings.seq_in
    return result


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def handoff_latency(spec: ModelSpec, prefill_tokens: int, decode_tokens: int, repeats: int
                    ) -> tuple[float, float]:
    """Milliseconds to send a prompt's and a step's hidden states between two processes
    (gloo over loopback: host-staged, as between two machines' stages)."""
    import multiprocessing as mp
    import socket
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = ctx.Queue()
    args = (port, spec.hidden_size, spec.dtype_bytes, (prefill_tokens, decode_tokens),
            repeats, queue)
    procs = [ctx.Process(target=_handoff_rank, args=(rank, *args)) for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        times: tuple[float, float] = queue.get(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return round(times[0], 4), round(times[1], 4)


def _handoff_rank(rank: int, port: int, hidden: int, dtype_bytes: int,
                  sizes: tuple[int, int], repeats: int, queue: Any) -> None:
    import os
    from datetime import timedelta

    import torch.distributed as dist
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=120))
    dtype = torch.float32 if dtype_bytes == 4 else torch.bfloat16
    out = []
    for tokens in sizes:
        x = torch.zeros(tokens, hidden, dtype=dtype)

        def hop(x: torch.Tensor = x) -> None:
            if rank == 0:
                dist.send(x, 1)
                dist.recv(x, 1)
            else:
                dist.recv(x, 0)
                dist.send(x, 0)
        out.append(_time_ms(hop, torch.device("cpu"), max(3, repeats)) / 2)
    if rank == 0:
        queue.put(tuple(out))
    dist.destroy_process_group()
