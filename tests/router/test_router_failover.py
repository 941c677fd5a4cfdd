"""Real processes on loopback: two `spotserve router` replicas over two test-double
drivers. The replica serving 64 opted-in streams is SIGKILLed mid-stream: each client
(`spotserve.client.ResumingClient`) resumes on the other replica and gets exactly the rest,
so all 64 outputs are identical to an uninterrupted run. Streams that did not opt in see a
clear error, and their drivers stop working on them."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio

from spotserve.client import Progress, ResumingClient
from spotserve.tokenizer import ModelTokenizer
from spotserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc

from .conftest import TOKEN
from .helpers import AUTH, expected
from .test_processes import Process, _spawn

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(180)]
OPTED_IN = 64
PLAIN = 8
TOKENS = 100


@pytest_asyncio.fixture
async def replicas(model_dir: Path, tokenizer: ModelTokenizer) -> AsyncIterator[list[Process]]:
    started: list[Process] = []
    try:
        for host in ("127.0.0.2", "127.0.0.3"):
            started.append(await _spawn(
                "-m", "tests.router.fake_worker", "--host", host, "--step", "0.02",
                "--vocab-size", str(tokenizer.vocab_size), "--token", TOKEN,
                ready="fake worker listening"))
        drivers = [f"--pipeline=p{i}={address}" for i, (_, address) in enumerate(started)]
        for _ in range(2):
            started.append(await _spawn(
                "-m", "spotserve.cli", "router", "--model", str(model_dir),
                "--served-model-name", "tiny", "--grpc", "127.0.0.1:0", "--http",
                "127.0.0.1:0", *drivers, "--max-concurrency", "64",
                "--log-level", "WARNING", ready="router listening"))
        yield started
    finally:
        for process, _ in started:
            if process.returncode is None:
                process.kill()
            await process.wait()


def _port(ports: str, name: str) -> str:
    return ports.split(f"{name}=")[1].split()[0]


async def test_sigkilled_router_loses_no_opted_in_stream(
        replicas: list[Process], tokenizer: ModelTokenizer) -> None:
    (_, a), (_, b), (victim, victim_ports), (_, survivor_ports) = replicas
    victim_grpc, survivor_grpc = _port(victim_ports, "grpc"), _port(survivor_ports, "grpc")
    client = ResumingClient([victim_grpc, survivor_grpc], spread=False, retry_every=0.05)
    prompts = [f"the router's node was reclaimed {i}" for i in range(OPTED_IN)]
    progress = {p: Progress() for p in prompts}

    async def resumable(prompt: str) -> tuple[list[int], str]:
        ids, text = [], ""
        request = inference_pb2.GenerateRequest(
            text=prompt, request_id=f"in-{prompt.split()[-1]}",
            sampling=common_pb2.SamplingParams(max_tokens=TOKENS))
        async for message in client.generate(request, progress[prompt], timeout=120):
            ids += message.token_ids
            text += message.text
        return ids, text

    plain_channel = grpc.aio.insecure_channel(victim_grpc)
    plain_stub = inference_pb2_grpc.InferenceStub(plain_channel)
    plain_progress = [0] * PLAIN

    async def plain(index: int) -> grpc.StatusCode | None:
        request = inference_pb2.GenerateRequest(
            text=f"no opt-in {index}", request_id=f"plain-{index}",
            sampling=common_pb2.SamplingParams(max_tokens=TOKENS))
        try:
            async for message in plain_stub.Generate(request, timeout=120):
                plain_progress[index] = message.tokens
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return None

    tasks = [asyncio.create_task(resumable(p)) for p in prompts]
    plains = [asyncio.create_task(plain(i)) for i in range(PLAIN)]
    # The worst moment is any moment: kill once every stream is under way, at whatever
    # token each has reached.
    while min(p.tokens for p in progress.values()) < 5 or min(plain_progress) < 5:
        assert not any(t.done() for t in tasks + plains), "a stream ended before the kill"
        await asyncio.sleep(0.01)
    at_kill = {p: progress[p].tokens for p in prompts}
    victim.send_signal(signal.SIGKILL)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
    codes = await asyncio.wait_for(asyncio.gather(*plains), 30)
    await client.close()
    await plain_channel.close()

    for prompt, (ids, text) in zip(prompts, results, strict=True):
        want_ids, want_text = expected(tokenizer, prompt, TOKENS)
        assert ids == want_ids, prompt          # no gap, no duplicate
        assert text == want_text, prompt
    assert all(progress[p].resumes >= 1 for p in prompts)
    assert any(at_kill[p] < TOKENS for p in prompts)  # the kill did cut streams
    assert codes == [grpc.StatusCode.UNAVAILABLE] * PLAIN, codes
    # The drivers stopped the requests whose router went away (no work for no one).
    await asyncio.sleep(0.5)
    for driver in (a, b):
        async with grpc.aio.insecure_channel(driver) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            for index in range(PLAIN):
                found = await stub.Lookup(worker_pb2.LookupRequest(
                    request_id=f"plain-{index}"), metadata=AUTH)
                assert not found.found, f"plain-{index} still held by {driver}"
    async with aiohttp.ClientSession() as session, session.get(
            f"http://{_port(survivor_ports, 'http')}/metrics") as response:
        metrics = await response.text()
    attached = [line for line in metrics.splitlines()
                if line.startswith('spotserve_requests_resumed_total{mode="attach"}')]
    assert attached and float(attached[0].split()[-1]) >= OPTED_IN
