"""The worker's KV-cache size (`spotserve worker --kv-blocks auto|N`, `--gpu-memory-utilization`,
`--kv-memory-gib`) and `--max-model-len` at admission.

No GPU needed: the GPU's total memory is injected (`size_kv_cache`'s `total_memory`, or
`kv_sizing.device_memory_bytes` for a worker serving on CPU), and the bytes are checked
against the published figures of Llama 3.1 and against the planner's memory check, which
must read the same bytes per token off the same function.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
import torch

from spotserve.auth import call_metadata
from spotserve.catalog import GIB
from spotserve.cli import build_parser
from spotserve.errors import SpotserveError
from spotserve.layout import (
    ParallelConfig,
    PipelineLayout,
    Position,
    StageLayout,
    kv_heads,
    position_kv_bytes_per_token,
    position_weight_bytes,
)
from spotserve.memory import USABLE_FRACTION, kv_bytes_per_block, step_reserve_bytes
from spotserve.model_spec import ModelSpec
from spotserve.models import builtin_models
from spotserve.operator.planner.memory import stage_bytes
from spotserve.v1 import worker_pb2, worker_pb2_grpc
from spotserve.worker import cli, kv_sizing
from spotserve.worker.engine.engine import EngineConfig
from spotserve.worker.engine.kv_cache import KVCache
from spotserve.worker.engine.scheduler import SchedulerConfig
from spotserve.worker.kv_sizing import (
    CPU_DEFAULT_BLOCKS,
    KVBudget,
    KVCacheTooSmall,
    parse_kv_blocks,
    size_kv_cache,
)
from spotserve.worker.server import WorkerOptions, start_server
from tests.worker.cluster import Stream, configure_pipeline, spawn, submit_request
from tests.worker.conftest import MAX_TOKENS, PROMPTS

LLAMA_8B = builtin_models()["llama-3.1-8b"]      # bf16, 32 layers, 8 KV heads x 128
LLAMA_70B = builtin_models()["llama-3.1-70b"]
ENGINE = EngineConfig(block_size=16, scheduler=SchedulerConfig(
    max_num_seqs=32, max_batched_tokens=2048, max_model_len=4096))
AUTO = KVBudget()


def _tp(model: ModelSpec, tp: int) -> ParallelConfig:
    return ParallelConfig.uniform(model.num_layers, 1, 1, tp)


def _size(gib: float, model: ModelSpec = LLAMA_8B, tp: int = 1,
          budget: KVBudget = AUTO, engine: EngineConfig = ENGINE) -> kv_sizing.KVSize:
    return size_kv_cache(budget, model, _tp(model, tp), Position(0, 0, 0), engine,
                         int(gib * GIB))


# ---- the sizing math ------------------------------------------------------------------
def test_auto_on_a_gpu_is_what_the_utilisation_leaves_after_weights_and_reserve() -> None:
    size = _size(80)
    config, pos = _tp(LLAMA_8B, 1), Position(0, 0, 0)
    # 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes = 128 KiB a token, 16 a block
    assert size.bytes_per_block == 128 * 1024 * 16 == kv_bytes_per_block(LLAMA_8B, config,
                                                                          pos, 16)
    assert size.weight_bytes == LLAMA_8B.weight_bytes       # one GPU holds the whole model
    reserve = step_reserve_bytes(LLAMA_8B, config, pos, max_batched_tokens=2048,
                                 max_num_seqs=32, max_model_len=4096)
    assert size.reserve_bytes == reserve and 0.5 * GIB < reserve < 8 * GIB
    usable = int(80 * GIB * 0.9)
    assert size.blocks == (usable - LLAMA_8B.weight_bytes - reserve) // (2 * 2**20)
    assert size.source == "gpu-memory" and not size.raised
    assert size.tokens == size.blocks * 16 and size.blocks > 20_000   # ~55 GiB of KV
    assert size.bytes + size.weight_bytes + size.reserve_bytes <= usable
    fields = size.fields()
    assert fields["kv_tokens"] == size.tokens and fields["gpu_memory"] == 80 * GIB
    # the utilisation is honoured
    lower = _size(80, budget=KVBudget(gpu_memory_utilization=0.5))
    assert lower.blocks == (40 * GIB - LLAMA_8B.weight_bytes - reserve) // (2 * 2**20)


def test_a_bigger_gpu_gives_more_blocks() -> None:
    sizes = [_size(gib).blocks for gib in (24, 40, 80, 141)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    # every extra GiB, x 0.9, is KV cache: 512 blocks of 2 MiB per GiB
    assert sizes[3] - sizes[2] == pytest.approx(61 * 0.9 * 512, abs=2)


def test_a_tensor_parallel_shard_gives_each_worker_more_blocks() -> None:
    whole, half, quarter = (_size(80, tp=tp) for tp in (1, 2, 4))
    assert half.bytes_per_block == whole.bytes_per_block // 2   # 4 of the 8 KV heads
    assert half.weight_bytes < whole.weight_bytes
    assert whole.blocks < half.blocks < quarter.blocks
    assert half.blocks > 2 * whole.blocks       # half the bytes a block, and more room
    # the second rank holds the other heads, at the same cost
    other = size_kv_cache(AUTO, LLAMA_8B, _tp(LLAMA_8B, 2), Position(0, 0, 1), ENGINE,
                          80 * GIB)
    assert other.blocks == half.blocks


def test_a_gpu_too_small_for_one_max_length_sequence_fails_with_the_numbers() -> None:
    with pytest.raises(KVCacheTooSmall) as err:
        _size(80, model=LLAMA_70B)                      # 131 GiB of weights on one GPU
    text = str(err.value)
    for number in (LLAMA_70B.weight_bytes, 80 * GIB, "needed", "--max-model-len 4096"):
        assert str(number) in text, text
    # the weights fit, the reserve and one 4096-token sequence (512 MiB) do not
    with pytest.raises(KVCacheTooSmall, match="cannot hold the model shard"):
        _size(16.5)
    # a shard of it fits: 4 GPUs of 80 GiB
    assert _size(80, model=LLAMA_70B, tp=4).blocks > 4096 // 16


def test_raised_to_one_max_length_sequence_when_the_gpu_still_holds_it() -> None:
    # 24 GiB x 0.7 leaves no room after 15 GiB of weights and the reserve; 24 GiB does
    size = _size(24, budget=KVBudget(gpu_memory_utilization=0.7))
    assert size.raised and size.blocks == 4096 // 16
    assert size.weight_bytes + size.reserve_bytes + size.bytes <= 24 * GIB


def test_explicit_budgets_and_cpu() -> None:
    cpu = size_kv_cache(AUTO, LLAMA_8B, _tp(LLAMA_8B, 1), Position(0, 0, 0), ENGINE, None)
    assert (cpu.blocks, cpu.source, cpu.reserve_bytes) == (CPU_DEFAULT_BLOCKS, "cpu-default", 0)
    gib = KVBudget(kv_memory_bytes=3 * GIB)
    for memory in (None, 80 * GIB):   # any device
        size = size_kv_cache(gib, LLAMA_8B, _tp(LLAMA_8B, 1), Position(0, 0, 0), ENGINE,
                             memory)
        assert (size.blocks, size.source) == (3 * 512, "kv-memory")
    fixed = _size(80, budget=KVBudget(blocks=100))
    assert (fixed.blocks, fixed.source) == (100, "kv-blocks")
    # one max-length sequence at least, whatever the budget
    tiny = size_kv_cache(KVBudget(kv_memory_bytes=2**20), LLAMA_8B, _tp(LLAMA_8B, 1),
                         Position(0, 0, 0), ENGINE, None)
    assert tiny.blocks == 4096 // 16 and tiny.raised
    with pytest.raises(KVCacheTooSmall, match="exceed the GPU's memory"):
        _size(80, budget=KVBudget(kv_memory_bytes=70 * GIB))
    with pytest.raises(KVCacheTooSmall, match="exceed the GPU's memory"):
        _size(24, budget=KVBudget(blocks=10_000))


def test_planner_and_worker_read_the_same_bytes_per_token(checkpoint: Path) -> None:
    """One implementation: the worker's bytes per block are the planner's bytes per token
    (`position_kv_bytes_per_token`, in `stage_bytes`) times the block, and the weight bytes
    it leaves room for are the planner's too, stage by stage and rank by rank."""
    tiny = ModelSpec.from_hf_config(checkpoint)
    stages = {LLAMA_8B: [(0, 32, 1), (0, 32, 2), (0, 10, 4), (10, 32, 2), (0, 32, 8)],
              LLAMA_70B: [(0, 80, 8), (0, 40, 4), (40, 80, 4), (20, 60, 2)],
              tiny: [(0, 4, 1), (0, 4, 2), (1, 3, 4), (0, 2, 2), (2, 4, 1)]}
    for model, cases in stages.items():
        for start, end, tp in cases:
            layout = [StageLayout(start, end, tp)]
            if start:
                layout.insert(0, StageLayout(0, start, 1))
            if end < model.num_layers:
                layout.append(StageLayout(end, model.num_layers, 1))
            config = ParallelConfig((PipelineLayout(tuple(layout)),))
            stage = 1 if start else 0
            sizes = [size_kv_cache(KVBudget(blocks=1), model, config, Position(0, stage, r),
                                   ENGINE, None) for r in range(tp)]
            for tokens in (1, 1000):
                worker = max(s.weight_bytes + s.bytes_per_block // 16 * tokens for s in sizes)
                assert worker == stage_bytes(model, tp, start, end, 1, tokens), \
                    (model.name, start, end, tp)
            per_token = {s.bytes_per_block // 16 for s in sizes}
            heads = -(-model.num_kv_heads // tp)
            assert per_token == {model.kv_bytes_per_token_per_layer // model.num_kv_heads
                                 * heads * (end - start)}
    whole = _tp(LLAMA_8B, 1)
    assert position_kv_bytes_per_token(LLAMA_8B, whole, Position(0, 0, 0)) == \
        LLAMA_8B.kv_bytes_per_token


def test_the_allocated_cache_takes_the_bytes_the_math_says(checkpoint: Path) -> None:
    model = ModelSpec.from_hf_config(checkpoint)
    config = ParallelConfig((PipelineLayout((StageLayout(0, 1, 1), StageLayout(1, 4, 2))),))
    for rank in range(2):
        pos = Position(0, 1, rank)
        cache = KVCache(range(1, 4), kv_heads(model, 2, rank), model.head_dim, 3, 4,
                        torch.float32)
        assert cache.bytes_per_block == kv_bytes_per_block(model, config, pos, 4)


# ---- the flags ----------------------------------------------------------------------
def _args(*argv: str) -> argparse.Namespace:
    return build_parser("worker").parse_args(["worker", *argv])


def test_cli_kv_blocks_auto_or_a_number() -> None:
    args = _args()
    assert args.kv_blocks is None and args.kv_memory_gib is None
    assert args.gpu_memory_utilization == USABLE_FRACTION == 0.9
    assert cli.kv_budget(args) == KVBudget()
    assert cli.engine_config(args).num_blocks == CPU_DEFAULT_BLOCKS
    for text in ("auto", "AUTO"):
        assert _args("--kv-blocks", text).kv_blocks is None
    args = _args("--kv-blocks", "64", "--block-size", "4", "--max-model-len", "128")
    assert cli.kv_budget(args).blocks == 64
    engine = cli.engine_config(args)
    assert (engine.num_blocks, engine.block_size, engine.scheduler.max_model_len) == (64, 4, 128)
    args = _args("--kv-memory-gib", "1.5", "--gpu-memory-utilization", "0.8")
    assert cli.kv_budget(args) == KVBudget(None, 0.8, int(1.5 * GIB))
    assert parse_kv_blocks(" 12 ") == 12
    for bad in ("0", "-3", "lots", "1.5"):
        with pytest.raises(SystemExit):
            _args("--kv-blocks", bad)
    for flags in (("--gpu-memory-utilization", "1.5"), ("--gpu-memory-utilization", "0"),
                  ("--kv-memory-gib", "0"), ("--max-model-len", "0")):
        with pytest.raises(SpotserveError, match=flags[0]):
            cli._check(_args(*flags))


# ---- a worker: its configuration's KV cache, and --max-model-len at admission -------
TOKEN = "kv-sizing-token"
META = call_metadata(TOKEN)


def _configure(model: ModelSpec, folder: Path, epoch: int) -> worker_pb2.ConfigureRequest:
    n = model.num_layers
    role = worker_pb2.Role(pipeline=0, stage=0, tp_rank=0, tp_size=1, layer_start=0,
                           layer_end=n, num_stages=1, pipeline_id=f"e{epoch}p0",
                           stages=[worker_pb2.StageShape(layer_start=0, layer_end=n,
                                                         tp_size=1)])
    return worker_pb2.ConfigureRequest(
        epoch=epoch, role=role, model=worker_pb2.ModelRef(checkpoint_path=str(folder)),
        rendezvous=worker_pb2.Rendezvous(world_size=1, rank=0, group_id=f"e{epoch}"))


def _submit(rid: str, prompt: int, max_tokens: int) -> worker_pb2.SubmitRequest:
    from spotserve.v1 import common_pb2
    return worker_pb2.SubmitRequest(
        request_id=rid, prompt_token_ids=[5] * prompt,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                           ignore_eos=True))


class _Worker:
    def __init__(self, server: grpc.aio.Server, channel: grpc.aio.Channel) -> None:
        self.server, self.channel = server, channel
        self.stub = worker_pb2_grpc.WorkerStub(channel)


async def _start(engine: EngineConfig, budget: KVBudget) -> AsyncIterator[_Worker]:
    torch.set_num_threads(1)
    options = WorkerOptions(token=TOKEN, engine=engine, kv=budget, bulk_port=-1)
    server, _, address = await start_server("127.0.0.1:0", options)
    channel = grpc.aio.insecure_channel(address)
    try:
        yield _Worker(server, channel)
    finally:
        await channel.close()
        await server.stop(0)


async def test_a_worker_sizes_each_configuration_and_refuses_longer_requests(
        checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker on a (pretend) GPU sizes its KV cache from the memory left after the
    shard, reports it in Status, refuses a request longer than --max-model-len at
    admission, serves one that fits, and fails a Configure its GPU cannot hold (the
    error names the numbers) leaving it in STANDBY, ready for the next."""
    model = ModelSpec.from_hf_config(checkpoint)
    engine = EngineConfig(block_size=4, scheduler=SchedulerConfig(
        max_num_seqs=4, max_batched_tokens=32, max_model_len=64))
    config, pos = ParallelConfig.uniform(model.num_layers, 1, 1, 1), Position(0, 0, 0)
    per_block = kv_bytes_per_block(model, config, pos, 4)
    fixed = position_weight_bytes(model, config, pos) + step_reserve_bytes(
        model, config, pos, max_batched_tokens=32, max_num_seqs=4, max_model_len=64)
    memory = {"bytes": int((fixed + 300 * per_block) / 0.5) + 1}
    monkeypatch.setattr(kv_sizing, "device_memory_bytes", lambda device: memory["bytes"])
    async for worker in _start(engine, KVBudget(gpu_memory_utilization=0.5)):
        stub = worker.stub
        reply = await stub.Configure(_configure(model, checkpoint, 1), metadata=META,
                                     timeout=60)
        assert reply.state == worker_pb2.WORKER_STATE_READY
        status = await stub.Status(worker_pb2.StatusRequest(), metadata=META, timeout=10)
        assert status.kv_blocks_total == 300
        # longer than --max-model-len (64): refused at admission, with the reason
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [d async for d in stub.Submit(_submit("long", 60, 10), metadata=META, timeout=30)]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "context length 64 (this worker's --max-model-len)" in err.value.details()
        # exactly --max-model-len is served to its end
        deltas = [d async for d in stub.Submit(_submit("fits", 54, 10), metadata=META,
                                               timeout=60)]
        assert sum(len(d.token_ids) for d in deltas) == 10
        # the next configuration finds less memory: fewer blocks
        memory["bytes"] = int((fixed + 100 * per_block) / 0.5) + 1
        await stub.Configure(_configure(model, checkpoint, 2), metadata=META, timeout=60)
        status = await stub.Status(worker_pb2.StatusRequest(), metadata=META, timeout=10)
        assert status.kv_blocks_total == 100
        # too little for one 64-token sequence (16 blocks): a clear error, no OOM later
        memory["bytes"] = fixed + 10 * per_block
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Configure(_configure(model, checkpoint, 3), metadata=META, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "needed" in err.value.details() and str(memory["bytes"]) in err.value.details()
        status = await stub.Status(worker_pb2.StatusRequest(), metadata=META, timeout=10)
        assert status.state == worker_pb2.WORKER_STATE_STANDBY
        memory["bytes"] = int((fixed + 50 * per_block) / 0.5) + 1
        reply = await stub.Configure(_configure(model, checkpoint, 4), metadata=META,
                                     timeout=60)
        assert reply.state == worker_pb2.WORKER_STATE_READY
        status = await stub.Status(worker_pb2.StatusRequest(), metadata=META, timeout=10)
        assert status.kv_blocks_total == 50


@pytest.mark.timeout(180)
async def test_a_pipeline_takes_its_smallest_rank_cache(
        checkpoint: Path, tmp_path: Path,
        reference: Callable[[list[int], int], list[int]]) -> None:
    """Two worker processes, one layer and three: the same KV budget holds three times the
    blocks on the first; the pipeline runs on the second's, which every rank allocates."""
    model = ModelSpec.from_hf_config(checkpoint)
    budget = "0.001"   # GiB: 1 KiB a block per layer (2 heads x 16 x 4 B x 2 x 4 tokens)
    first, second = await asyncio.gather(*(
        spawn(f"127.0.0.{i}", checkpoint, tmp_path, "--kv-blocks", "auto", "--kv-memory-gib",
              budget) for i in (20, 21)))
    try:
        config = ParallelConfig((PipelineLayout((StageLayout(0, 1, 1), StageLayout(1, 4, 1))),),
                                batch=8)
        await configure_pipeline(model, 1, config, {Position(0, 0, 0): first,
                                                    Position(0, 1, 0): second})
        blocks = [int(0.001 * GIB) // (1024 * layers) for layers in (1, 3)]
        assert (await first.status()).kv_blocks_total == min(blocks) == 349
        stream = Stream(first, submit_request("r1", PROMPTS["r1"], MAX_TOKENS))
        assert await stream.result() == reference(PROMPTS["r1"], MAX_TOKENS)
        assert "KV cache cut to the pipeline's smallest" in first.log.read_text()
        assert '"kv_tokens": 1396' in second.log.read_text()
    finally:
        await asyncio.gather(first.stop(), second.stop())
