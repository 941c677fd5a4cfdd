"""Benchmark part: time from `Drain` to the resumed first token, on real worker processes.

A random Llama (hidden 768, 12 layers, 12 heads / 4 KV heads, vocab 16384: ~100M
parameters, ~400 MB in fp32) is saved as safetensors. Workers A and B serve it as one
(P=1, M=2) pipeline on 127.0.0.2/3; `--requests` requests with `--prompt`-token prompts
decode until each has `--before` tokens; then the pipeline is drained (0 more steps, KV
kept: A and B each keep their KV heads), worker C (127.0.0.4) is configured as (P=1, M=1)
with every Configure built as the controller builds it (the migration plan's transfers),
and the requests are resumed on C from their KV, which C pulls rank to rank: A's heads from
A, B's from B, in parallel. Two cases: `cold` (C also pulls every weight slice from A and
B), and `preloaded` (C gathered its weights while the pipeline still served, as joining
GPUs do, so only the KV moves after the drain). Reported per case: drain, configure, first
resumed token, and the same requests resumed by re-prefill instead (the baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from spotserve.auth import call_metadata
from spotserve.catalog import Catalog
from spotserve.layout import ParallelConfig, Position
from spotserve.model_spec import ModelSpec
from spotserve.operator.controller.actuator import DrainedRequest
from spotserve.operator.controller.configure import explicit_epoch, explicit_plan
from spotserve.operator.local.runner import CATALOG
from spotserve.operator.planner.cluster import GpuId, Placement
from spotserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from spotserve.worker.transfer import CHANNEL_OPTIONS

MODEL = {"architectures": ["LlamaForCausalLM"], "hidden_size": 768,
         "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
         "num_key_value_heads": 4, "vocab_size": 16384, "max_position_embeddings": 2048,
         "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1,
         "eos_token_id": 2, "torch_dtype": "float32"}
TOKEN = "bench"
META = call_metadata(TOKEN)
ROOT = Path(__file__).resolve().parents[2]
KIND = Catalog.load(CATALOG).instance("cpu-1x")  # one GPU per instance: a worker per host


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=4, help="requests in flight (4)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (128)")
    parser.add_argument("--before", type=int, default=16,
                        help="tokens each request has when the drain comes (16)")
    parser.add_argument("--worker-threads", type=int, default=1,
                        help="torch threads per worker process (1)")


def save_model(folder: Path) -> ModelSpec:
    """Random weights under the model's HF names (safetensors), no transformers needed."""
    import torch
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(MODEL))
    spec = ModelSpec.from_hf_config(folder)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for t in spec.tensors():
        if t.name.endswith("norm.weight"):
            tensors[t.name] = torch.ones(t.shape)
        else:
            tensors[t.name] = 0.02 * torch.randn(t.shape, generator=generator)
    save_file(tensors, str(folder / "model.safetensors"))
    return spec


class _Worker:
    def __init__(self, process: asyncio.subprocess.Process, address: str) -> None:
        self.process, self.address = process, address
        self.host = address.rsplit(":", 1)[0]
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)

    async def stop(self) -> None:
        await self.channel.close()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def _spawn(host: str, model: Path, threads: int) -> _Worker:
    env = {**os.environ, "SPOTSERVE_TOKEN": TOKEN, "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": str(threads)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spotserve.cli", "worker", "--listen", f"{host}:0",
        "--model", str(model), "--threads", str(threads), "--kv-blocks", "256",
        "--log-level", "INFO", cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL if not os.environ.get("BENCH_LOGS") else None)
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 120)).decode()
    if "worker listening" not in line:
        raise RuntimeError(f"worker on {host} did not start: {line!r}")
    return _Worker(process, line.split()[-1])


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _placement(config: ParallelConfig, workers: dict[Position, _Worker]) -> Placement:
    return Placement.of(config, {p: GpuId(w.host, 0) for p, w in workers.items()})


async def _configure(spec: ModelSpec, folder: Path, epoch: int, config: ParallelConfig,
                     placement: dict[Position, _Worker], old: ParallelConfig | None = None,
                     old_placement: dict[Position, _Worker] | None = None,
                     drained: list[DrainedRequest] | None = None, preload: bool = False
                     ) -> list[worker_pb2.ConfigureResponse]:
    """Configure `config` on `placement` as the controller would (from `old`, handing old
    pipeline 0's `drained` requests' KV to new pipeline 0); with `preload`, only gather."""
    workers = {GpuId(w.host, 0): w for w in [*placement.values(), *(old_placement or {}).values()]}
    before = _placement(old, old_placement) if old and old_placement else None
    built = explicit_epoch(spec, str(folder), epoch, _placement(config, placement), before,
                           {g: w.address for g, w in workers.items()}, KIND,
                           old_ids=["e1p0"], drained=drained or [], free_port=_free_port)
    for _, request in built:
        request.preload_only = preload
    return list(await asyncio.gather(*(
        workers[g].stub.Configure(r, metadata=META, timeout=300) for g, r in built)))


def _submit(rid: str, prompt: list[int], max_tokens: int, generated: list[int] | None = None,
            mode: int = 0) -> worker_pb2.SubmitRequest:
    request = worker_pb2.SubmitRequest(
        request_id=rid, prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                           ignore_eos=True))
    if generated:
        request.resume.generated_token_ids.extend(generated)
        request.resume.mode = mode  # type: ignore[assignment]
    return request


async def _first_tokens(worker: _Worker, requests: list[worker_pb2.SubmitRequest],
                        start: float) -> list[float]:
    """Seconds from `start` to each request's first new token (then it is cancelled)."""
    async def one(request: worker_pb2.SubmitRequest) -> float:
        call = worker.stub.Submit(request, metadata=META, timeout=300)
        async for delta in call:
            if delta.token_ids:
                call.cancel()
                return time.perf_counter() - start
        raise RuntimeError(f"{request.request_id} ended without a token")
    return list(await asyncio.gather(*(one(r) for r in requests)))


async def _resume_case(args: argparse.Namespace, folder: Path, spec: ModelSpec,
                       preloaded: bool) -> dict[str, Any]:
    workers = await asyncio.gather(*(_spawn(f"127.0.0.{i}", folder, args.worker_threads)
                                     for i in (2, 3, 4)))
    a, b, c = workers
    try:
        old = ParallelConfig.uniform(spec.num_layers, 1, 1, 2, batch=args.requests)
        old_placement = {Position(0, 0, 0): a, Position(0, 0, 1): b}
        single = ParallelConfig.uniform(spec.num_layers, 1, 1, 1, batch=args.requests)
        await _configure(spec, folder, 1, old, old_placement)
        if preloaded:  # concurrent initialization: C gathers its weights while A, B serve
            await _configure(spec, folder, 2, single, {Position(0, 0, 0): c}, old,
                             old_placement, preload=True)
        prompts = {f"r{i}": [(17 * i + 31 * j) % 16000 + 3 for j in range(args.prompt)]
                   for i in range(args.requests)}
        max_tokens = args.before + 64
        got: dict[str, list[int]] = {rid: [] for rid in prompts}
        enough = asyncio.Event()

        async def stream(rid: str) -> None:
            async for delta in a.stub.Submit(_submit(rid, prompts[rid], max_tokens),
                                             metadata=META, timeout=600):
                got[rid].extend(delta.token_ids)
                if all(len(t) >= args.before for t in got.values()):
                    enough.set()

        tasks = [asyncio.ensure_future(stream(rid)) for rid in prompts]
        await asyncio.wait_for(enough.wait(), 600)
        t0 = time.perf_counter()
        drained = await a.stub.Drain(worker_pb2.DrainRequest(steps=0), metadata=META,
                                     timeout=120)
        t_drain = time.perf_counter() - t0
        await asyncio.gather(*tasks)
        moved = [DrainedRequest(r.request_id, r.prompt_tokens, r.generated_tokens,
                                r.kv_tokens) for r in drained.requests]
        (reply,) = await _configure(spec, folder, 2, single, {Position(0, 0, 0): c}, old,
                                    old_placement, drained=moved)
        planned = _planned(spec, single, c, old, old_placement, moved, preloaded)
        t_configure = time.perf_counter() - t0
        kv_resumes = [_submit(rid, prompts[rid], max_tokens, got[rid], common_pb2.RESUME_MODE_KV)
                      for rid in prompts]
        firsts = await _first_tokens(c, kv_resumes, t0)
        t1 = time.perf_counter()
        reprefill = [_submit(rid, prompts[rid], max_tokens, got[rid],
                             common_pb2.RESUME_MODE_REPREFILL) for rid in prompts]
        refirsts = await _first_tokens(c, reprefill, t1)
        kv_bytes = sum(p.kv_tokens for p in drained.requests) * spec.kv_bytes_per_token
        return {
            "case": "preloaded" if preloaded else "cold",
            "model_params": spec.num_parameters, "requests": args.requests,
            "prompt_tokens": args.prompt, "tokens_before_drain": args.before,
            "drain_s": t_drain, "configure_s": t_configure - t_drain,
            "weights_bytes_pulled": reply.bytes_pulled - kv_bytes, "kv_bytes_pulled": kv_bytes,
            "bytes_kept": reply.bytes_kept,
            "bytes_from_checkpoint": reply.bytes_from_checkpoint,
            # what the planner costs for this move (before preloading) vs what C pulled
            "planned_kv_bytes": planned["kv"], "planned_weight_bytes": planned["weights"],
            "planned_seconds": planned["seconds"],
            "first_resumed_token_s": min(firsts), "last_resumed_token_s": max(firsts),
            "reprefill_first_token_s": min(refirsts),
            "reprefill_last_token_s": max(refirsts),
        }
    finally:
        await asyncio.gather(*(w.stop() for w in workers))


def _planned(spec: ModelSpec, config: ParallelConfig, c: _Worker, old: ParallelConfig,
             old_placement: dict[Position, _Worker], drained: list[DrainedRequest],
             preloaded: bool) -> dict[str, float | None]:
    """The planner's bytes into C for the resume, and its time estimate for the move: KV
    pieces, and weights unless C preloaded them (then they are already in its memory)."""
    workers = {GpuId(w.host, 0): w for w in [c, *old_placement.values()]}
    plan = explicit_plan(spec, _placement(config, {Position(0, 0, 0): c}),
                         _placement(old, old_placement),
                         {g: w.address for g, w in workers.items()}, KIND, drained=drained)
    kv = sum(t.nbytes for t in plan.transfers if t.kv_pipeline is not None)
    weights = sum(t.nbytes for t in plan.transfers if t.kv_pipeline is None)
    # the estimate is for the whole move (cpu-1x's nominal 1 Gbit/s NIC plus the fixed
    # overhead), so only the cold case is comparable with it
    return {"kv": kv, "weights": 0 if preloaded else weights,
            "seconds": None if preloaded else plan.seconds}


def run_resume(args: argparse.Namespace) -> dict[str, Any]:
    """Both cases, each on fresh workers; the figures by case."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        spec = save_model(folder)
        for preloaded in (False, True):
            result = asyncio.run(_resume_case(args, folder, spec, preloaded))
            out[result["case"]] = result
            _print(result)
    return out


def _print(result: dict[str, Any]) -> None:
    print(f"\ndrain -> resumed first token ({result['case']}): "
          f"{result['model_params'] / 1e6:.0f}M-parameter Llama, (P=1, M=2) on 2 workers -> "
          f"(P=1, M=1) on a third, {result['requests']} requests x {result['prompt_tokens']} "
          f"prompt + {result['tokens_before_drain']} generated tokens")
    weights = (f"{result['weights_bytes_pulled'] / 2**20:.0f} MiB weights" if
               result["weights_bytes_pulled"] else "no weights (preloaded)")
    rows = [("drain (0 more steps, KV kept)", result["drain_s"]),
            (f"configure: {weights} + {result['kv_bytes_pulled'] / 2**20:.1f} MiB KV",
             result["configure_s"]),
            (f"  planned: {result['planned_weight_bytes'] / 2**20:.0f} MiB weights + "
             f"{result['planned_kv_bytes'] / 2**20:.1f} MiB KV"
             + (", estimated" if result["planned_seconds"] is not None else ""),
             result["planned_seconds"]),
            ("Drain -> first resumed token (KV)", result["first_resumed_token_s"]),
            ("Drain -> every request's first token (KV)", result["last_resumed_token_s"]),
            ("re-prefill instead: submit -> first token", result["reprefill_first_token_s"]),
            ("re-prefill: every request's first token", result["reprefill_last_token_s"])]
    for name, seconds in rows:
        print(f"  {name:<48} " + ("" if seconds is None else f"{seconds:>8.3f} s"))
