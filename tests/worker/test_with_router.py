"""The real router in front of real workers: `spotserve router` dispatches to two
one-GPU pipelines (`spotserve worker` processes); one is SIGKILLed mid-stream and its
requests finish on the other by re-prefill, token-identical to an uninterrupted run. This
checks that the worker speaks the contract the router expects (Submit, resume, errors)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from pathlib import Path

import grpc
import pytest

from spotserve.layout import ParallelConfig, Position
from spotserve.model_spec import ModelSpec
from spotserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.engine.tiny_models import save_tiny
from tests.router.tiny_model import build_model_dir
from tests.worker.cluster import ROOT, TOKEN, configure_pipeline, spawn

pytestmark = pytest.mark.timeout(240)
PROMPTS = [[1, 40, 41, 42, 43], [1, 77, 12], [1, 200, 201, 202, 203, 204, 205]]
TOKENS = 60


@pytest.fixture(scope="module")
def served_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose vocabulary is the router test tokenizer's."""
    tokenizer_dir = build_model_dir(tmp_path_factory.mktemp("tokenizer"))
    from tokenizers import Tokenizer
    vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    folder = save_tiny(tmp_path_factory.mktemp("served") / "llama", "llama", seed=11,
                       vocab_size=vocab)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


async def _router(model: Path, pipelines: dict[str, str]
                  ) -> tuple[asyncio.subprocess.Process, str]:
    env = {**os.environ, "SPOTSERVE_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    args = ["-m", "spotserve.cli", "router", "--model", str(model), "--served-model-name",
            "tiny", "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0", "--resume-timeout", "30",
            "--log-level", "WARNING"]
    for pid, address in pipelines.items():
        args += ["--pipeline", f"{pid}={address}"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, *args, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
    assert "router listening" in line, line
    return process, line.split("grpc=")[1].split()[0]


async def test_router_resumes_on_a_real_worker_after_a_sigkill(
        served_model: Path, tmp_path: Path) -> None:
    from spotserve.worker.engine.builder import local_engine
    from spotserve.worker.engine.sequence import SamplingParams
    spec = ModelSpec.from_hf_config(served_model)
    engine = local_engine(served_model)
    reference = []
    for i, prompt in enumerate(PROMPTS):   # uninterrupted runs
        engine.submit(f"ref{i}", prompt, SamplingParams(max_tokens=TOKENS, ignore_eos=True))
        reference.append([e.token_id for e in engine.run()])

    workers = await asyncio.gather(*(spawn(f"127.0.0.{i}", served_model, tmp_path)
                                     for i in (10, 11)))
    router = None
    try:
        config = ParallelConfig.uniform(spec.num_layers, 1, 1, 1, batch=8)
        for w in workers:
            await configure_pipeline(spec, 1, config, {Position(0, 0, 0): w})
        router, address = await _router(served_model, {f"p{i}": w.address
                                                        for i, w in enumerate(workers)})
        got: list[list[int]] = [[] for _ in PROMPTS]
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)

            async def generate(i: int) -> None:
                request = inference_pb2.GenerateRequest(
                    token_ids=inference_pb2.TokenIds(ids=PROMPTS[i]),
                    sampling=common_pb2.SamplingParams(max_tokens=TOKENS, temperature=0.0,
                                                       ignore_eos=True))
                async for message in stub.Generate(request, timeout=120):
                    got[i].extend(message.token_ids)

            tasks = [asyncio.ensure_future(generate(i)) for i in range(len(PROMPTS))]
            while min(len(t) for t in got) < 3:
                await asyncio.sleep(0.005)
            busy = [w for w in workers if (await w.status()).running > 0]
            assert busy, "some worker must be generating"
            busy[0].process.send_signal(signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
        assert got == reference
    finally:
        if router is not None and router.returncode is None:
            router.kill()
            await router.wait()
        await asyncio.gather(*(w.stop(timeout=15) for w in workers))
