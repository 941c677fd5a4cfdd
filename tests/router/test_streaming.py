"""Loopback integration: the OpenAI client and a gRPC client stream through the router to
test-double pipeline drivers; models, health, readiness and metrics."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import openai
import pytest

from spotserve.operator.router.dispatch import Pipeline
from spotserve.tokenizer import ChatMessage, ModelTokenizer
from spotserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from .conftest import StartRouter, StartWorker
from .fake_worker import fake_completion
from .helpers import expected, generate

pytestmark = pytest.mark.asyncio
PROMPT = "the quick brown fox"


async def _two_pipelines(start_worker: StartWorker, start_router: StartRouter):  # type: ignore[no-untyped-def]
    _, _, a = await start_worker("127.0.0.2")
    _, _, b = await start_worker("127.0.0.3")
    return await start_router([Pipeline("p0", a), Pipeline("p1", b)])


async def test_grpc_client_streams_a_completion(start_worker: StartWorker,
                                                start_router: StartRouter,
                                                tokenizer: ModelTokenizer) -> None:
    app = await _two_pipelines(start_worker, start_router)
    out = await generate(app, PROMPT, 40)
    ids, text = expected(tokenizer, PROMPT, 40)
    assert out.token_ids == ids and out.text == text
    assert out.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert out.completion_tokens == 40 and out.messages > 1


async def test_grpc_token_prompt_stop_token_and_models(start_worker: StartWorker,
                                                       start_router: StartRouter,
                                                       tokenizer: ModelTokenizer) -> None:
    app = await _two_pipelines(start_worker, start_router)
    prompt = tokenizer.encode(PROMPT)
    ids = fake_completion(prompt, 30, tokenizer.vocab_size)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=prompt), model="tiny",
            sampling=common_pb2.SamplingParams(max_tokens=30, stop_token_ids=[ids[9]]))
        got = [m async for m in stub.Generate(request)]
        models = await stub.ListModels(inference_pb2.ListModelsRequest())
        health = await stub.Health(common_pb2.HealthRequest())
    assert [t for m in got for t in m.token_ids] == ids[: ids.index(ids[9]) + 1]
    assert got[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert models.models[0].name == "tiny" and models.models[0].max_context == 256
    assert health.status == common_pb2.HealthResponse.STATUS_SERVING


async def test_openai_client_streams_and_not(start_worker: StartWorker,
                                             start_router: StartRouter,
                                             tokenizer: ModelTokenizer) -> None:
    app = await _two_pipelines(start_worker, start_router)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{app.http_port}/v1",
                                api_key="unused", max_retries=0)
    _, text = expected(tokenizer, PROMPT, 24)
    stream = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24,
                                             stream=True,
                                             stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    async for event in stream:
        if event.choices:
            pieces.append(event.choices[0].text)
            finish = event.choices[0].finish_reason or finish
        if event.usage:
            usage = event.usage
    assert "".join(pieces) == text and len(pieces) > 1 and finish == "length"
    assert usage is not None and usage.completion_tokens == 24
    whole = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24)
    assert whole.choices[0].text == text and whole.usage.completion_tokens == 24  # type: ignore[union-attr]
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    await client.close()


async def test_openai_chat_uses_the_chat_template(start_worker: StartWorker,
                                                  start_router: StartRouter,
                                                  tokenizer: ModelTokenizer) -> None:
    app = await _two_pipelines(start_worker, start_router)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{app.http_port}/v1",
                                api_key="unused", max_retries=0)
    messages = [ChatMessage("system", "be brief"), ChatMessage("user", "hi there")]
    prompt = tokenizer.encode_chat(messages)
    bos = tokenizer.encode("x")[0]
    assert prompt[0] == bos and prompt.count(bos) == 1  # from the template, not added twice
    text = tokenizer.decode(fake_completion(prompt, 20, tokenizer.vocab_size))
    payload = [{"role": m.role, "content": m.content} for m in messages]
    stream = await client.chat.completions.create(model="tiny", messages=payload,  # type: ignore[arg-type]
                                                  max_tokens=20, stream=True)
    pieces, roles = [], []
    async for event in stream:
        delta = event.choices[0].delta
        roles.append(delta.role)
        pieces.append(delta.content or "")
    assert "".join(pieces) == text and roles[0] == "assistant"
    whole = await client.chat.completions.create(model="tiny", messages=payload,  # type: ignore[arg-type]
                                                 max_tokens=20, stop=["zzz-never"])
    assert whole.choices[0].message.content == text
    await client.close()


async def test_stop_string_cuts_the_text(start_worker: StartWorker,
                                         start_router: StartRouter,
                                         tokenizer: ModelTokenizer) -> None:
    app = await _two_pipelines(start_worker, start_router)
    _, text = expected(tokenizer, PROMPT, 60)
    stop = text[20:23]
    out = await generate(app, PROMPT, 60, stop=[stop])
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == common_pb2.FINISH_REASON_STOP


async def test_health_ready_and_metrics(start_worker: StartWorker, start_router: StartRouter,
                                        tokenizer: ModelTokenizer) -> None:
    app = await start_router([])
    base = f"http://127.0.0.1:{app.http_port}"
    async with aiohttp.ClientSession() as http:
        assert (await http.get(f"{base}/healthz")).status == 200
        assert (await http.get(f"{base}/readyz")).status == 503
        _, _, address = await start_worker()
        await app.router.update_topology(2, [Pipeline("p0", address)], [])
        assert (await http.get(f"{base}/readyz")).status == 200
        await asyncio.gather(*(generate(app, PROMPT, 8) for _ in range(3)))
        body = await (await http.get(f"{base}/metrics")).text()
    for name in ("spotserve_requests_total", "spotserve_time_to_first_token_seconds_bucket",
                 "spotserve_inter_token_latency_seconds", "spotserve_e2e_request_latency",
                 "spotserve_num_requests_waiting", "spotserve_num_requests_running",
                 "spotserve_requests_resumed", "vllm:num_requests_waiting",
                 "vllm:num_requests_running", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_count"):
        assert name in body, name
    assert 'spotserve_requests_total{finish_reason="length"} 3.0' in body
    # the vLLM names and types dashboards read (issue 15, item 6), labelled by model_name
    from prometheus_client.parser import text_string_to_metric_families
    families = {f.name: f for f in text_string_to_metric_families(body)}
    for name, kind in (("vllm:num_requests_running", "gauge"),
                       ("vllm:num_requests_waiting", "gauge"),
                       ("vllm:prompt_tokens", "counter"),
                       ("vllm:generation_tokens", "counter"),
                       ("vllm:request_success", "counter"),
                       ("vllm:time_to_first_token_seconds", "histogram"),
                       ("vllm:time_per_output_token_seconds", "histogram"),
                       ("vllm:inter_token_latency_seconds", "histogram"),
                       ("vllm:e2e_request_latency_seconds", "histogram")):
        family = families[name]
        assert family.type == kind, name
        assert all("model_name" in s.labels for s in family.samples), name
    def value(name: str, **labels: str) -> float:
        return next(s.value for s in families[name.rsplit("_total", 1)[0]].samples
                    if s.name == name and labels.items() <= s.labels.items())
    assert value("vllm:request_success_total", finished_reason="length") == 3
    assert value("vllm:generation_tokens_total") == 3 * 8
    assert value("vllm:prompt_tokens_total") > 0
