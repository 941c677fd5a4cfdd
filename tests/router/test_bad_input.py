"""Loopback integration: every bad input is a 400 / INVALID_ARGUMENT naming the field; a
full queue is a 429 with Retry-After / RESOURCE_EXHAUSTED; keys and tokens are checked."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import grpc
import pytest

from spotserve.operator.router.dispatch import Pipeline
from spotserve.v1 import common_pb2, control_pb2, inference_pb2, inference_pb2_grpc

from .conftest import StartRouter, StartWorker
from .helpers import AUTH, control, generate

pytestmark = pytest.mark.asyncio
GOOD = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
LONG = "word " * 400

COMPLETION_CASES: list[tuple[dict[str, Any], str]] = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": LONG}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.2}, "top_p"),
    ({"top_k": -5}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"stop": 5}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"n": 2}, "n"),
    ({"logprobs": 3}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"stop_token_ids": ["x"]}, "stop_token_ids"),
    ({"model": "gpt-4"}, "model"),
    ({"stream": "yes"}, "stream"),
    ({"prompt": "a \ud800 b"}, "prompt"),     # lone UTF-16 surrogates: not Unicode
    ({"stop": "x\udfff"}, "stop"),
    ({"stop": ["ok", "\ud800"]}, "stop[1]"),
]
CHAT_CASES: list[tuple[dict[str, Any], str]] = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": LONG}]}, "prompt"),
    ({"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": "\ud800"}, "stop"),
]


async def _post(port: int, path: str, body: Any, **kwargs: Any) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as http, \
            http.post(f"http://127.0.0.1:{port}{path}", json=body, **kwargs) as response:
        return response.status, await response.json(), response.headers


async def test_every_bad_http_input_is_a_400_naming_the_field(
        start_worker: StartWorker, start_router: StartRouter) -> None:
    _, _, address = await start_worker()
    app = await start_router([Pipeline("p0", address)])
    for case, field in COMPLETION_CASES:
        status, body, _ = await _post(app.http_port, "/v1/completions", {**GOOD, **case})
        assert status == 400, (case, body)
        assert body["error"]["message"].startswith(field), (case, body)
        assert body["error"]["type"] == "invalid_request_error"
    for case, field in CHAT_CASES:
        status, body, _ = await _post(app.http_port, "/v1/chat/completions",
                                      {"model": "tiny", **case})
        assert status == 400 and body["error"]["message"].startswith(field), (case, body)
    async with aiohttp.ClientSession() as http, \
            http.post(f"http://127.0.0.1:{app.http_port}/v1/completions",
                      data=b"{not json") as response:
        assert response.status == 400
        assert (await response.json())["error"]["message"].startswith("body")
    status, _, _ = await _post(app.http_port, "/v1/completions", GOOD)
    assert status == 200


@pytest.mark.parametrize(("request_", "field"), [
    (inference_pb2.GenerateRequest(sampling=common_pb2.SamplingParams(max_tokens=4)),
     "prompt"),
    (inference_pb2.GenerateRequest(text="", sampling=common_pb2.SamplingParams(max_tokens=4)),
     "prompt"),
    (inference_pb2.GenerateRequest(text="hi"), "max_tokens"),
    (inference_pb2.GenerateRequest(text="hi", model="nope",
                                   sampling=common_pb2.SamplingParams(max_tokens=4)), "model"),
    (inference_pb2.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(
        max_tokens=4, temperature=-2)), "temperature"),
    (inference_pb2.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(
        max_tokens=4, top_p=2)), "top_p"),
    (inference_pb2.GenerateRequest(text=LONG, sampling=common_pb2.SamplingParams(
        max_tokens=4)), "prompt"),
])
async def test_bad_grpc_input_is_invalid_argument(start_worker: StartWorker,
                                                  start_router: StartRouter,
                                                  request_: inference_pb2.GenerateRequest,
                                                  field: str) -> None:
    _, _, address = await start_worker()
    app = await start_router([Pipeline("p0", address)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in inference_pb2_grpc.InferenceStub(channel).Generate(request_):
                pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(field)


async def test_queue_overflow_is_429_and_resource_exhausted(start_worker: StartWorker,
                                                            start_router: StartRouter) -> None:
    _, _, address = await start_worker(step_seconds=0.02)
    app = await start_router([Pipeline("p0", address, max_concurrency=2)], max_queue=2)
    busy = [asyncio.create_task(generate(app, f"busy {i}", 40)) for i in range(4)]
    while app.router.scheduler.queued < 2:
        await asyncio.sleep(0.005)
    status, body, headers = await _post(app.http_port, "/v1/completions", GOOD)
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert "queue is full" in body["error"]["message"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(app, "one too many", 4)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(info.value.trailing_metadata() or ())["retry-after"]
    results = await asyncio.gather(*busy)  # the admitted ones all finish
    assert all(r.completion_tokens == 40 for r in results)
    assert 'spotserve_requests_rejected_total{reason="queue_full"} 2.0' in \
        app.router.metrics.render().decode()


async def test_api_keys_and_internal_token(start_worker: StartWorker,
                                           start_router: StartRouter) -> None:
    _, _, address = await start_worker()
    app = await start_router([Pipeline("p0", address)], api_keys=["k1"])
    status, body, _ = await _post(app.http_port, "/v1/completions", GOOD)
    assert status == 401 and "API key" in body["error"]["message"]
    status, _, _ = await _post(app.http_port, "/v1/completions", GOOD,
                               headers={"Authorization": "Bearer k1"})
    assert status == 200
    channel, stub = control(app)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Stats(control_pb2.StatsRequest())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    stats = await stub.Stats(control_pb2.StatsRequest(), metadata=AUTH)
    assert stats.completed == 1 and stats.epoch == 1 and stats.arrival_rate_ewma > 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.UpdateTopology(control_pb2.Topology(epoch=3, pipelines=[
            control_pb2.PipelineInfo(id="p0", state=control_pb2.PIPELINE_STATE_SERVING)]),
            metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("pipelines[0].driver_address")
    await channel.close()


async def test_duplicate_request_id_and_no_pipeline(start_worker: StartWorker,
                                                    start_router: StartRouter) -> None:
    _, _, address = await start_worker(step_seconds=0.01)
    app = await start_router([Pipeline("p0", address)], queue_timeout=0.3)
    first = asyncio.create_task(generate(app, "hello", 50, request_id="same"))
    while not app.router.stats().requests:
        await asyncio.sleep(0.005)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(app, "hello", 5, request_id="same")
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert (await first).completion_tokens == 50
    await app.router.update_topology(2, [], [])
    status, body, _ = await _post(app.http_port, "/v1/completions", GOOD)
    assert status == 503 and "no pipeline is serving" in body["error"]["message"]


async def test_a_driver_refusing_the_request_is_invalid_argument(
        start_worker: StartWorker, start_router: StartRouter) -> None:
    _, _, address = await start_worker(max_context=32)
    app = await start_router([Pipeline("p0", address)])
    status, body, _ = await _post(app.http_port, "/v1/completions",
                                  {**GOOD, "max_tokens": 40})
    assert status == 400 and "context length 32" in body["error"]["message"]


async def test_models_by_id_and_http_errors_in_openai_shape(
        start_worker: StartWorker, start_router: StartRouter) -> None:
    """`GET /v1/models/{id}` (issue 15, item 8); an unknown path, a wrong method and a body
    too large answer in OpenAI's JSON error shape, as every other error does."""
    app = await start_router([])
    base = f"http://127.0.0.1:{app.http_port}"
    async with aiohttp.ClientSession() as http:
        listed = await (await http.get(f"{base}/v1/models")).json()
        name = listed["data"][0]["id"]
        one = await http.get(f"{base}/v1/models/{name}")
        assert one.status == 200 and (await one.json())["id"] == name
        for method, path, data, status in (
                ("GET", "/v1/models/gpt-4", None, 404),
                ("GET", "/v1/nothing/here", None, 404),
                ("GET", "/v1/completions", None, 405),
                ("POST", "/v1/completions", b"x" * (9 * 1024 * 1024), 413)):
            async with http.request(method, base + path, data=data) as response:
                body = await response.json()
                assert response.status == status, (path, body)
                assert set(body["error"]) == {"message", "type", "param", "code"}, body
                assert body["error"]["message"], body
        missing = await (await http.get(f"{base}/v1/models/gpt-4")).json()
        assert missing["error"]["code"] == "model_not_found"


async def test_lenient_on_content_type_and_unknown_fields_logged_once(
        start_worker: StartWorker, start_router: StartRouter,
        caplog: pytest.LogCaptureFixture) -> None:
    """The documented leniency (issue 15, item 9): a JSON body sent as text/plain (or
    curl's form encoding) is read; an unknown field is ignored and logged once."""
    _, _, address = await start_worker()
    app = await start_router([Pipeline("p0", address)])
    url = f"http://127.0.0.1:{app.http_port}/v1/completions"
    caplog.set_level(logging.DEBUG, logger="spotserve.operator.router.openai_http")
    async with aiohttp.ClientSession() as http:
        for kind in ("text/plain", "application/x-www-form-urlencoded"):
            body = json.dumps({**GOOD, "temprature": 0.5}).encode()
            async with http.post(url, data=body, headers={"Content-Type": kind}) as response:
                assert response.status == 200, await response.text()
    noted = [r for r in caplog.records if "temprature" in r.getMessage()]
    assert len(noted) == 1 and noted[0].levelno == logging.DEBUG
