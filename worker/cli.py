"""`spotserve worker`: one process per GPU serving the Worker gRPC service (`--gpus N`: a
group of N such processes under one parent, worker/group.py).

Prints `worker listening HOST:PORT` on stdout once it accepts calls (tests and the local
backend wait for that line). Logs are JSON lines on stderr. SIGTERM (or SIGINT) drains:
running requests finish until 40% of the grace period, the rest pause with their KV kept,
which peers may pull until 80% of it has passed; the last 20% closes the server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn

from spotserve.errors import SpotserveError
from spotserve.memory import USABLE_FRACTION
from spotserve.worker.kv_sizing import CPU_DEFAULT_BLOCKS, KVBudget, parse_kv_blocks

if TYPE_CHECKING:
    from spotserve.worker.engine.engine import EngineConfig

HELP = "run one GPU's worker: the Worker gRPC service (engine, tensor streaming, drain/resume)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="0.0.0.0:50051",
                        help="host:port to serve on (port 0: any free port)")
    parser.add_argument("--gpus", type=int, default=1, metavar="N",
                        help="serve N GPUs: a worker process per GPU, GPU i on the --listen "
                        "(and --advertise, --metrics) port + i and device cuda:i (1: this "
                        "process serves one GPU; on Kubernetes, a pod holds all of an "
                        "instance's GPUs)")
    parser.add_argument("--advertise", default=None,
                        help="address peers use to reach this worker (default: --listen)")
    parser.add_argument("--model", default=None,
                        help="HF model folder used when Configure names none")
    parser.add_argument("--dtype", default=None, help="float32/bfloat16/float16 "
                        "(default: the model's; float16 for a bfloat16 model on a GPU "
                        "without bf16, such as a T4 or V100)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N "
                        "(default: cuda if available; cuda means cuda:$LOCAL_RANK when set)")
    parser.add_argument("--token-file", default=None,
                        help="file with the shared token (default: $SPOTSERVE_TOKEN)")
    parser.add_argument("--kv-blocks", type=parse_kv_blocks, default="auto", metavar="auto|N",
                        help="KV-cache blocks per configuration: a number, or auto (default): "
                        "on a CUDA GPU, what --gpu-memory-utilization of its memory holds "
                        "after this worker's weight shard and an activation reserve; on CPU "
                        "512; with --kv-memory-gib, that budget. Never below one "
                        "--max-model-len sequence (the Configure fails when the GPU cannot "
                        "hold that)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=USABLE_FRACTION,
                        metavar="FRACTION",
                        help=f"share of the GPU's memory for weights, activations and KV "
                        f"cache with --kv-blocks auto ({USABLE_FRACTION}, the planner's)")
    parser.add_argument("--kv-memory-gib", type=float, default=None, metavar="GIB",
                        help="KV-cache budget in GiB per worker with --kv-blocks auto, on any "
                        "device (default: from --gpu-memory-utilization on a GPU)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block (16)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay decode steps from CUDA graphs captured per bucketed "
                        "batch and context size (one launch per step instead of hundreds; "
                        "stages without tensor parallelism; off until measured on your GPU: "
                        "see docs/gpu.md)")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="batch limit (32)")
    parser.add_argument("--max-batched-tokens", type=int, default=2048,
                        help="token budget per step (2048)")
    parser.add_argument("--max-model-len", type=int, default=4096,
                        help="longest prompt + output (4096, capped by the model); longer "
                        "requests are refused when submitted")
    parser.add_argument("--streams-per-peer", type=int, default=2,
                        help="parallel PullTensors streams per peer (2)")
    parser.add_argument("--send-limit-mbps", type=float, default=0.0,
                        help="cap on bytes/s (MB/s) served to peers, 0 = none")
    parser.add_argument("--bulk-port", type=int, default=0, metavar="PORT",
                        help="TCP port on the --listen host for tensor streaming to peers "
                        "(PullTensors negotiated over gRPC, bytes over plain TCP); 0 = any "
                        "free port (default), -1 = off (peers then stream over gRPC)")
    parser.add_argument("--join-timeout", type=float, default=60.0,
                        help="seconds to wait for a pipeline's ranks to join (60)")
    parser.add_argument("--peer-timeout", type=float, default=5.0,
                        help="seconds a pipeline collective waits for a peer before the "
                        "pipeline counts as broken and its requests resume elsewhere (5); "
                        "must exceed the slowest engine step")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds between SIGTERM and exit (30)")
    parser.add_argument("--metrics", default=None, metavar="HOST:PORT",
                        help="serve Prometheus metrics here")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--log-level", default="INFO",
                        type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="log lines at this level and above (INFO)")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _check(args: argparse.Namespace) -> None:
    for flag, value in (("--peer-timeout", args.peer_timeout),
                        ("--join-timeout", args.join_timeout), ("--grace", args.grace)):
        if not value > 0:
            raise SpotserveError(f"{flag} {value}: must be a positive number of seconds")
    for flag, value in (("--block-size", args.block_size), ("--max-num-seqs", args.max_num_seqs),
                        ("--max-batched-tokens", args.max_batched_tokens),
                        ("--max-model-len", args.max_model_len)):
        if value < 1:
            raise SpotserveError(f"{flag} {value}: must be positive")
    kv_budget(args)


def kv_budget(args: argparse.Namespace) -> KVBudget:
    """The `KVBudget` of the KV-cache flags (raises `SpotserveError` on a bad one)."""
    return KVBudget.from_flags(args.kv_blocks, args.gpu_memory_utilization, args.kv_memory_gib)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The `EngineConfig` of the flags; with --kv-blocks auto, its block count is a
    placeholder each Configure replaces."""
    from spotserve.worker.engine.engine import EngineConfig
    from spotserve.worker.engine.scheduler import SchedulerConfig
    return EngineConfig(args.kv_blocks or CPU_DEFAULT_BLOCKS, args.block_size, SchedulerConfig(
        args.max_num_seqs, args.max_batched_tokens, args.max_model_len),
        cuda_graphs=args.cuda_graphs)


def run(args: argparse.Namespace) -> int:
    _check(args)
    if args.gpus != 1:
        from spotserve.worker import group
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return group.run(parser, args)
    _serve_one(args)


def device_of(requested: str | None, cuda_available: bool, local_rank: str | None) -> str:
    """The torch device a worker uses: `requested`, else cuda when there is one; `cuda`
    alone is the GPU of this process's `LOCAL_RANK` in a group (torchrun's convention)."""
    device = requested or ("cuda" if cuda_available else "cpu")
    if device == "cuda" and local_rank and local_rank.isdigit():
        return f"cuda:{local_rank}"
    return device


def bf16_ok(device: str, torch: Any) -> bool:
    """Whether `device` does bf16 math natively (every CPU torch runs it; on CUDA, compute
    capability 8.0 and up)."""
    if not device.startswith("cuda"):
        return True
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def check_device(device: str, torch: Any) -> None:
    """Refuse a device this process cannot use, saying why (a CPU-only torch, no GPU
    visible, an index past the GPUs there are)."""
    if not device.startswith("cuda"):
        return
    if not torch.backends.cuda.is_built():
        raise SpotserveError(f"--device {device}: this torch ({torch.__version__}) is a "
                             "CPU-only build; install a CUDA build, or use --device cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise SpotserveError(f"--device {device}: no CUDA GPU is visible (CUDA_VISIBLE_DEVICES="
                             f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use "
                             "--device cpu")
    index = device.partition(":")[2]
    if index.isdigit() and int(index) >= count:
        raise SpotserveError(f"--device {device}: only {count} GPU(s) visible")


def _serve_one(args: argparse.Namespace) -> NoReturn:
    import asyncio
    from pathlib import Path

    from spotserve.lifetime import die_with_parent_if_asked

    die_with_parent_if_asked()  # before anything starts threads
    # A collective that fails or times out (a peer died) aborts its NCCL communicator and
    # raises, instead of torch's default of killing this process: the worker keeps its
    # weights for the next configuration (a user's setting wins).
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")

    import torch

    from spotserve.auth import load_token
    from spotserve.worker.server import WorkerOptions

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_of(args.device, torch.cuda.is_available(), os.environ.get("LOCAL_RANK"))
    check_device(device, torch)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))  # NCCL and new tensors: this GPU
    engine, budget = engine_config(args), kv_budget(args)
    logging.getLogger(__name__).info("worker starting", extra={"fields": {
        "device": device, "kv_cache": budget.describe(), "block_size": args.block_size,
        "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
        "max_batched_tokens": args.max_batched_tokens}})
    options = WorkerOptions(
        address=args.advertise or "", checkpoint=Path(args.model) if args.model else None,
        dtype=args.dtype, device=device, bf16=bf16_ok(device, torch),
        token=load_token(args.token_file), engine=engine, kv=budget,
        join_timeout_s=args.join_timeout,
        peer_timeout_s=args.peer_timeout,
        streams_per_peer=args.streams_per_peer, send_bytes_per_s=args.send_limit_mbps * 1e6,
        bulk_port=args.bulk_port)
    if not options.token:
        logging.getLogger(__name__).warning(
            "no shared token (--token-file or $SPOTSERVE_TOKEN): every call is accepted")
    code = asyncio.run(_serve(args, options))
    # A follower may still sit in a collective of a pipeline that is gone; tearing its
    # native threads down at interpreter exit would abort, so leave right away.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _serve(args: argparse.Namespace, options: Any) -> int:
    import asyncio
    import signal

    from spotserve.worker.metrics import WorkerMetrics
    from spotserve.worker.server import start_server

    metrics = WorkerMetrics()
    if args.metrics:
        host, port = args.metrics.rsplit(":", 1)
        metrics.serve(host, int(port))
    server, servicer, address = await start_server(args.listen, options, metrics)
    print(f"worker listening {address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger(__name__).info("stopping", extra={"fields": {"grace": args.grace}})
    stopping_at = loop.time()
    await servicer.shutdown(args.grace * 0.8)
    if servicer.paused.ids():
        # the paused requests' KV stays here for peers to pull until the grace is nearly
        # up: the controller learns of an eviction a moment after this process does
        await asyncio.sleep(max(0.0, stopping_at + args.grace * 0.8 - loop.time()))
    await server.stop(args.grace * 0.2)
    await servicer.stop_bulk()  # or a transfer in flight could hold the exit up
    return 0
