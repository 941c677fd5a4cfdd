"""Admission with several router replicas: each replica counts only its own requests
against a pipeline's cap, so together they would oversubscribe it; the driver refuses a
fresh submission beyond its cap and the replica sends the request to another pipeline or
holds it in its queue. The cap holds, nothing is lost, and a full queue is still a 429
with Retry-After."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from spotserve.operator.router.dispatch import Pipeline
from spotserve.tokenizer import ModelTokenizer
from spotserve.v1 import common_pb2

from .conftest import StartRouter, StartWorker
from .helpers import expected, generate

pytestmark = pytest.mark.asyncio
CAP = 2
TOKENS = 20


async def test_two_replicas_never_run_more_than_the_drivers_cap(
        start_worker: StartWorker, start_router: StartRouter,
        tokenizer: ModelTokenizer) -> None:
    workers = []
    pipelines = []
    for index, host in enumerate(("127.0.0.2", "127.0.0.3")):
        worker, _, address = await start_worker(host, step_seconds=0.01, max_batch=CAP)
        workers.append(worker)
        pipelines.append(Pipeline(f"p{index}", address))
    replicas = [await start_router(pipelines, max_concurrency=CAP, max_queue=64)
                for _ in range(2)]
    prompts = [f"two replicas, one cap {i}" for i in range(16)]
    results = await asyncio.gather(*(generate(replicas[i % 2], p, TOKENS)
                                     for i, p in enumerate(prompts)))
    for prompt, out in zip(prompts, results, strict=True):
        assert out.token_ids == expected(tokenizer, prompt, TOKENS)[0], prompt
        assert out.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert max(w.peak for w in workers) <= CAP
    assert all(w.peak == CAP for w in workers)    # and both pipelines were used to it
    refused = sum(r.router.metrics.pipeline_full._value.get() for r in replicas)
    assert refused > 0, "the replicas together should have met a full driver"
    assert sum(r.router.stats().failed for r in replicas) == 0
    # A refusal before the first token is no interruption: nothing was resumed.
    assert all(r.router.metrics.resumed.labels(mode)._value.get() == 0
               for r in replicas for mode in ("kv", "reprefill"))


async def test_a_full_queue_is_429_with_retry_after_across_replicas(
        start_worker: StartWorker, start_router: StartRouter) -> None:
    worker, _, address = await start_worker("127.0.0.2", step_seconds=0.02, max_batch=CAP)
    replicas = [await start_router([Pipeline("p0", address)], max_concurrency=CAP,
                                   max_queue=2) for _ in range(2)]
    body = {"model": "tiny", "prompt": "crowded", "max_tokens": TOKENS, "stream": True}

    async def post(session: aiohttp.ClientSession, port: int) -> tuple[int, str, str]:
        async with session.post(f"http://127.0.0.1:{port}/v1/completions",
                                json=body) as response:
            text = await response.text()
            return response.status, response.headers.get("Retry-After", ""), text

    async with aiohttp.ClientSession() as session:
        replies = await asyncio.gather(*(post(session, replicas[i % 2].http_port)
                                         for i in range(24)))
    statuses = [status for status, _, _ in replies]
    assert set(statuses) == {200, 429}, statuses
    for status, retry_after, text in replies:
        if status == 429:
            assert retry_after and int(retry_after) >= 1
            assert "queue is full" in text
        else:   # every admitted request ran to its end
            assert text.rstrip().endswith("data: [DONE]") and '"length"' in text
    assert worker.peak <= CAP
