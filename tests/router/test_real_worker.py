"""The router in front of two REAL `spotserve worker` processes (a tiny random Llama on
CPU, greedy): a drain with KV hints resumes in KV mode, a SIGKILLed driver is resumed by
re-prefill, and every output equals the uninterrupted run. Skipped without torch."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from spotserve.operator.router.app import RouterApp
from spotserve.operator.router.dispatch import Pipeline, PipelineState
from spotserve.operator.router.topology import ResumeHint
from spotserve.v1 import worker_pb2, worker_pb2_grpc

from .conftest import TOKEN, router_args
from .helpers import AUTH, Streamed, generate

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = [pytest.mark.asyncio, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [" ".join(f"t{(7 * i + j) % 120 + 5}" for j in range(12)) for i in range(5)]
TOKENS = 64
Workers = list[tuple[asyncio.subprocess.Process, str]]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint plus a word-level tokenizer over its 131 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tests.engine.tiny_models import save_tiny

    folder = save_tiny(tmp_path_factory.mktemp("llama") / "tiny-llama", "llama")
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(131)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({}))
    return folder


async def _spawn_worker(host: str, model: Path) -> tuple[asyncio.subprocess.Process, str]:
    env = {**os.environ, "SPOTSERVE_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spotserve.cli", "worker", "--listen", f"{host}:0", "--model",
        str(model), "--device", "cpu", "--threads", "1", "--log-level", "WARNING", cwd=ROOT,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 120)).decode()
    assert "listening" in line, line
    return process, line.split()[-1]


async def _configure(address: str, pipeline_id: str, model: Path) -> None:
    """What the controller does: one single-GPU pipeline over all 4 layers."""
    stage = worker_pb2.StageShape(layer_start=0, layer_end=4, tp_size=1)
    role = worker_pb2.Role(stage=0, tp_rank=0, tp_size=1, layer_start=0, layer_end=4,
                           num_stages=1, pipeline_id=pipeline_id, max_batch=8, stages=[stage])
    request = worker_pb2.ConfigureRequest(epoch=1, role=role, model=worker_pb2.ModelRef(
        name="tiny", checkpoint_path=str(model)))
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await worker_pb2_grpc.WorkerStub(channel).Configure(request, metadata=AUTH,
                                                                      timeout=120)
    assert reply.state == worker_pb2.WORKER_STATE_READY


async def _drain(address: str) -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await worker_pb2_grpc.WorkerStub(channel).Drain(
            worker_pb2.DrainRequest(epoch=1, steps=2), metadata=AUTH)
    return [r.request_id for r in reply.requests if r.kv_kept]


@pytest_asyncio.fixture
async def workers(llama_dir: Path) -> AsyncIterator[Workers]:
    started: Workers = []
    try:
        for host in ("127.0.0.2", "127.0.0.3"):
            started.append(await _spawn_worker(host, llama_dir))
        await asyncio.gather(*(_configure(a, f"p{i}", llama_dir)
                               for i, (_, a) in enumerate(started)))
        yield started
    finally:
        for process, _ in started:
            if process.returncode is None:
                process.kill()
            await process.wait()


async def _run_all(app: RouterApp, tag: str) -> list[asyncio.Task[Streamed]]:
    tasks = [asyncio.create_task(generate(app, p, TOKENS, request_id=f"{tag}{i}",
                                          temperature=0.0)) for i, p in enumerate(PROMPTS)]
    for _ in range(2000):  # every request has streamed a few tokens (or already ended)
        progress = {r.request_id: r.generated_tokens for r in app.router.stats().requests}
        if all(task.done() or progress.get(f"{tag}{i}", 0) >= 4
               for i, task in enumerate(tasks)):
            return tasks
        await asyncio.sleep(0.005)
    raise AssertionError("the requests made no progress")


async def test_real_workers_drain_kv_and_kill(workers: Workers, llama_dir: Path) -> None:
    (_, a0), (victim, a1) = workers
    app = RouterApp.from_args(router_args(llama_dir, resume_timeout=30.0,
                                          request_timeout=120.0),
                              pipelines=[], token=TOKEN, api_keys=[])
    await app.start()
    try:
        serving = [Pipeline("p0", a0), Pipeline("p1", a1)]
        await app.router.update_topology(1, serving, [])
        reference = await asyncio.gather(*(generate(app, p, TOKENS, temperature=0.0)
                                           for p in PROMPTS))
        # A drain on both drivers keeps the KV; the controller brings them back and hints.
        tasks = await _run_all(app, "kv")
        draining = [Pipeline(p.id, p.driver_address, state=PipelineState.DRAINING)
                    for p in serving]
        await app.router.update_topology(2, draining, [])
        paused = {"p0": await _drain(a0), "p1": await _drain(a1)}
        await asyncio.gather(_configure(a0, "p0", llama_dir), _configure(a1, "p1", llama_dir))
        hints = [ResumeHint(rid, pid, "kv") for pid, rids in paused.items() for rid in rids]
        await app.router.update_topology(3, serving, hints)
        for got, want in zip(await asyncio.gather(*tasks), reference, strict=True):
            assert got.token_ids == want.token_ids and got.text == want.text
        metrics = app.router.metrics.render().decode()
        assert hints and f'spotserve_requests_resumed_total{{mode="kv"}} {len(hints)}.0' \
            in metrics
        # A driver dies without notice: re-prefill on the other one.
        tasks = await _run_all(app, "kill")
        victim.send_signal(signal.SIGKILL)
        for got, want in zip(await asyncio.gather(*tasks), reference, strict=True):
            assert got.token_ids == want.token_ids and got.text == want.text
        assert 'spotserve_requests_resumed_total{mode="reprefill"}' in \
            app.router.metrics.render().decode()
    finally:
        await app.stop(grace=0)
