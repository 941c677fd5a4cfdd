"""Out of device memory in a real worker process: a Configure whose stage does not fit
fails with a clear reason and leaves the worker in standby, ready for the next one; a
request whose step does not fit is rejected with the reason (INVALID_ARGUMENT, which the
router passes on) while the requests beside it and after it are served.

CPU tensors never raise CUDA's out-of-memory error, so the worker process is started with
a `sitecustomize` (on its PYTHONPATH) that raises `torch.OutOfMemoryError` where CUDA
would: the first stage build, and every step of more than `STEP_TOKENS` tokens. Nothing
in spotserve itself knows about it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from spotserve.layout import ParallelConfig, Position
from spotserve.model_spec import ModelSpec
from tests.worker.cluster import Stream, Worker, configure_pipeline, spawn, submit_request

pytestmark = pytest.mark.timeout(180)
STEP_TOKENS = 12     # steps of more tokens than this run out of memory
FAULTS = f'''
import torch
from spotserve.worker import server
from spotserve.worker.engine import runner

_step, _build, _builds = runner.StageRunner.step, server.build_runner, []


def step(self, plan):
    if sum(len(c.token_ids) for c in plan.chunks) > {STEP_TOKENS}:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
    return _step(self, plan)


def build_runner(*args, **kwargs):
    _builds.append(1)
    if len(_builds) == 1:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB")
    return _build(*args, **kwargs)


runner.StageRunner.step, server.build_runner = step, build_runner
'''


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def worker(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[Worker]:
    site = tmp_path_factory.mktemp("faults")
    (site / "sitecustomize.py").write_text(FAULTS)
    w = await spawn("127.0.0.9", checkpoint, tmp_path_factory.mktemp("oom"),
                    env={"PYTHONPATH": str(site)})
    try:
        yield w
    finally:
        await w.stop()


@pytest.mark.asyncio(loop_scope="module")
async def test_out_of_memory_at_configure_then_at_a_step_costs_only_that_request(
        worker: Worker, checkpoint: Path,
        reference: Callable[[list[int], int], list[int]]) -> None:
    spec = ModelSpec.from_hf_config(checkpoint)
    config = ParallelConfig.uniform(spec.num_layers, 1, 1, 1, batch=8)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await configure_pipeline(spec, 1, config, {Position(0, 0, 0): worker})
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "out of memory building stage 0" in (failed.value.details() or "")
    assert "back in standby" in (failed.value.details() or "")
    await configure_pipeline(spec, 2, config, {Position(0, 0, 0): worker})   # it recovered

    short = [[5, 17, 99, 3], [9, 4, 77, 8]]
    long = list(range(30, 50))                  # a 20-token prefill: never fits
    streams = [Stream(worker, submit_request(f"s{i}", p, 16)) for i, p in enumerate(short)]
    doomed = Stream(worker, submit_request("long", long, 16))
    for stream, prompt in zip(streams, short, strict=True):
        assert await stream.task == reference(prompt, 16)
    with pytest.raises(grpc.aio.AioRpcError) as rejected:
        await doomed.task
    assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "out of memory: request long (20 tokens" in (rejected.value.details() or "")
    after = Stream(worker, submit_request("after", short[0], 8))   # it goes on serving
    assert await asyncio.wait_for(after.task, 60) == reference(short[0], 8)
