"""Loopback integration: client cancellation and deadlines reach the pipeline driver, and
the router gives the slot back."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import pytest

from spotserve.operator.router.dispatch import Pipeline
from spotserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from .conftest import StartRouter, StartWorker

pytestmark = pytest.mark.asyncio


async def _settled(app, worker) -> None:  # type: ignore[no-untyped-def]
    for _ in range(300):
        if not worker.running and app.router.scheduler.total_running == 0 \
                and not app.router.stats().requests:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the request is still running somewhere")


def _request(max_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        text="cancel me", sampling=common_pb2.SamplingParams(max_tokens=max_tokens))


async def test_grpc_client_cancel_reaches_the_worker(start_worker: StartWorker,
                                                     start_router: StartRouter) -> None:
    worker, _, address = await start_worker(step_seconds=0.01)
    app = await start_router([Pipeline("p0", address)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        call = inference_pb2_grpc.InferenceStub(channel).Generate(_request(200))
        for _ in range(3):
            await call.read()
        assert worker.running
        call.cancel()
        await _settled(app, worker)
    assert 'spotserve_requests_total{finish_reason="cancelled"} 1.0' in \
        app.router.metrics.render().decode()


async def test_grpc_deadline_reaches_the_worker(start_worker: StartWorker,
                                                start_router: StartRouter) -> None:
    worker, _, address = await start_worker(step_seconds=0.01)
    app = await start_router([Pipeline("p0", address)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in inference_pb2_grpc.InferenceStub(channel).Generate(
                    _request(200), timeout=0.3):
                pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _settled(app, worker)


async def test_http_client_disconnect_reaches_the_worker(start_worker: StartWorker,
                                                         start_router: StartRouter) -> None:
    worker, _, address = await start_worker(step_seconds=0.01)
    app = await start_router([Pipeline("p0", address)])
    body = {"prompt": "cancel me", "max_tokens": 200, "stream": True}
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"http://127.0.0.1:{app.http_port}/v1/completions",
                                   json=body)
        await response.content.readline()
        assert worker.running
        response.close()
    await _settled(app, worker)


async def test_shutdown_lets_running_requests_finish(start_worker: StartWorker,
                                                     start_router: StartRouter) -> None:
    from .helpers import generate

    _, _, address = await start_worker(step_seconds=0.005)
    app = await start_router([Pipeline("p0", address)])
    task = asyncio.create_task(generate(app, "finish me", 60))
    while not app.router.stats().requests:
        await asyncio.sleep(0.005)
    await app.stop(grace=5.0)
    assert not app.router.ready()
    assert (await task).completion_tokens == 60
