"""Resumable streams on loopback: a request whose stream broke is taken up on any router
replica (here two in-process routers over the same test-double drivers) and the client
gets exactly the tokens it did not have, no gap and no duplicate; gRPC natively and HTTP
through the documented headers. Requests that did not opt in behave as before: the
broken stream cancels them."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
import pytest

from spotserve.operator.router.app import RouterApp
from spotserve.operator.router.dispatch import Pipeline
from spotserve.tokenizer import ModelTokenizer
from spotserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from .conftest import StartRouter, StartWorker
from .helpers import Streamed, expected

pytestmark = pytest.mark.asyncio
TOKENS = 40


def _stub(app: RouterApp) -> tuple[grpc.aio.Channel, inference_pb2_grpc.InferenceStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
    return channel, inference_pb2_grpc.InferenceStub(channel)


def _take(out: Streamed, message: inference_pb2.GenerateResponse) -> None:
    out.token_ids.extend(message.token_ids)
    out.text += message.text
    out.messages += 1
    out.completion_tokens = message.tokens
    if message.finish_reason:
        out.finish_reason = message.finish_reason


async def _broken_stream(app: RouterApp, prompt: str, request_id: str, after: int,
                         *, resumable: bool = True) -> Streamed:
    """Stream a request and drop the connection once `after` tokens arrived: what a client
    sees when the replica serving it dies."""
    channel, stub = _stub(app)
    out = Streamed()
    call = stub.Generate(inference_pb2.GenerateRequest(
        text=prompt, request_id=request_id, resumable=resumable,
        sampling=common_pb2.SamplingParams(max_tokens=TOKENS)), timeout=30)
    async for message in call:
        _take(out, message)
        if out.completion_tokens >= after:
            break
    call.cancel()
    await channel.close()
    return out


async def _resume(app: RouterApp, request_id: str, received: int) -> Streamed:
    channel, stub = _stub(app)
    out = Streamed()
    async with channel:
        async for message in stub.Resume(inference_pb2.ResumeRequest(
                request_id=request_id, received_tokens=received), timeout=30):
            _take(out, message)
    return out


async def _two_routers(start_worker: StartWorker, start_router: StartRouter,
                       step: float = 0.01) -> tuple[RouterApp, RouterApp]:
    _, _, a = await start_worker("127.0.0.2", step_seconds=step)
    _, _, b = await start_worker("127.0.0.3", step_seconds=step)
    pipelines = [Pipeline("p0", a), Pipeline("p1", b)]
    return await start_router(pipelines), await start_router(pipelines)


async def test_a_broken_stream_resumes_on_another_replica_with_no_gap_or_duplicate(
        start_worker: StartWorker, start_router: StartRouter,
        tokenizer: ModelTokenizer) -> None:
    first, second = await _two_routers(start_worker, start_router)
    prompts = {f"r{i}": f"a spot node went away {i}" for i in range(6)}
    # Each stream breaks after a different number of tokens, none of them chosen to
    # match a chunk boundary.
    heads = await asyncio.gather(*(_broken_stream(first, p, rid, after=3 + 5 * i)
                                   for i, (rid, p) in enumerate(prompts.items())))
    tails = await asyncio.gather(*(_resume(second, rid, head.completion_tokens)
                                   for rid, head in zip(prompts, heads, strict=True)))
    for (rid, prompt), head, tail in zip(prompts.items(), heads, tails, strict=True):
        ids, text = expected(tokenizer, prompt, TOKENS)
        assert head.token_ids + tail.token_ids == ids, rid
        assert head.text + tail.text == text, rid
        assert tail.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert tail.completion_tokens == TOKENS
    assert second.router.stats().completed == len(prompts)


async def test_resume_after_the_request_finished_gets_only_its_end(
        start_worker: StartWorker, start_router: StartRouter,
        tokenizer: ModelTokenizer) -> None:
    first, second = await _two_routers(start_worker, start_router, step=0.002)
    head = await _broken_stream(first, "finished while away", "done-1", after=2)
    await asyncio.sleep(TOKENS * 0.002 + 0.5)   # the driver runs it to its end meanwhile
    tail = await _resume(second, "done-1", head.completion_tokens)
    ids, text = expected(tokenizer, "finished while away", TOKENS)
    assert head.token_ids + tail.token_ids == ids
    assert head.text + tail.text == text
    assert tail.finish_reason == common_pb2.FINISH_REASON_LENGTH
    # A client that had every token but not the last message (its finish) gets just that.
    again = await _resume(second, "done-1", TOKENS)
    assert again.token_ids == [] and again.completion_tokens == TOKENS
    assert again.finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_resume_on_the_same_replica_supersedes_the_stream_it_still_holds(
        start_worker: StartWorker, start_router: StartRouter,
        tokenizer: ModelTokenizer) -> None:
    """The client reconnects before the replica noticed its first connection died: the
    old stream ends (ABORTED), the new one has the rest."""
    first, _ = await _two_routers(start_worker, start_router)
    channel, stub = _stub(first)
    old = Streamed()
    call = stub.Generate(inference_pb2.GenerateRequest(
        text="half-open connection", request_id="twice", resumable=True,
        sampling=common_pb2.SamplingParams(max_tokens=TOKENS)), timeout=30)
    async for message in call:
        _take(old, message)
        if old.completion_tokens >= 4:
            break
    tail = await _resume(first, "twice", old.completion_tokens)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    assert raised.value.code() == grpc.StatusCode.ABORTED
    await channel.close()
    ids, _ = expected(tokenizer, "half-open connection", TOKENS)
    assert old.token_ids + tail.token_ids == ids
    assert first.router.stats().failed == 0   # a superseded stream is no failure


async def test_requests_that_did_not_opt_in_are_cancelled_with_their_stream(
        start_worker: StartWorker, start_router: StartRouter) -> None:
    first, second = await _two_routers(start_worker, start_router)
    head = await _broken_stream(first, "not resumable", "plain-1", after=3, resumable=False)
    assert head.completion_tokens >= 3
    await asyncio.sleep(0.2)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _resume(second, "plain-1", head.completion_tokens)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "not held" in (raised.value.details() or "")


async def test_cancel_stops_a_detached_request_everywhere(
        start_worker: StartWorker, start_router: StartRouter) -> None:
    first, second = await _two_routers(start_worker, start_router, step=0.02)
    head = await _broken_stream(first, "given up on", "gone-1", after=2)
    channel, stub = _stub(second)
    async with channel:
        reply = await stub.Cancel(inference_pb2.CancelGenerateRequest(request_id="gone-1"))
        assert reply.found
        await asyncio.sleep(0.1)   # a few of its steps: it stopped, so no one has it
        again = await stub.Cancel(inference_pb2.CancelGenerateRequest(request_id="gone-1"))
        assert not again.found
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _resume(second, "gone-1", head.completion_tokens)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_resume_of_an_unknown_request_is_not_found(
        start_worker: StartWorker, start_router: StartRouter) -> None:
    first, _ = await _two_routers(start_worker, start_router)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _resume(first, "never-sent", 0)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_resumable_generate_names_its_id_before_any_token(
        start_worker: StartWorker, start_router: StartRouter) -> None:
    first, _ = await _two_routers(start_worker, start_router)
    channel, stub = _stub(first)
    async with channel:
        call = stub.Generate(inference_pb2.GenerateRequest(
            text="who am i", resumable=True,
            sampling=common_pb2.SamplingParams(max_tokens=2)), timeout=30)
        metadata = dict(await call.initial_metadata())
        request_id = metadata["x-spotserve-request-id"]
        assert request_id.startswith("req-")
        ids = [m.request_id async for m in call]
        assert ids and ids[0] == request_id


# ---- HTTP ---------------------------------------------------------------------------------

async def _sse(response: aiohttp.ClientResponse, stop_after: int | None = None
               ) -> tuple[list[tuple[str | None, dict[str, object]]], bool]:
    """The events of an SSE stream as (id, data); stops early after `stop_after` events
    with an id at or past it. True when it read to [DONE]."""
    events: list[tuple[str | None, dict[str, object]]] = []
    event_id: str | None = None
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("id: "):
            event_id = line[4:]
        elif line == "data: [DONE]":
            return events, True
        elif line.startswith("data: "):
            events.append((event_id, json.loads(line[6:])))
            if stop_after is not None and event_id is not None and int(event_id) >= stop_after:
                return events, False
            event_id = None
    return events, False


def _text(events: list[tuple[str | None, dict[str, object]]], chat: bool) -> str:
    out = ""
    for _, data in events:
        for choice in data["choices"]:  # type: ignore[attr-defined]
            out += choice["delta"].get("content", "") if chat else choice["text"]
    return out


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
async def test_http_opt_in_resumes_on_another_replica(
        start_worker: StartWorker, start_router: StartRouter, chat: bool) -> None:
    first, second = await _two_routers(start_worker, start_router)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, object] = {"model": "tiny", "max_tokens": TOKENS, "stream": True}
    if chat:
        body["messages"] = [{"role": "user", "content": "resume me"}]
    else:
        body["prompt"] = "resume me"
    async with aiohttp.ClientSession() as session:
        # The whole answer, uninterrupted, as the reference.
        async with session.post(f"http://127.0.0.1:{first.http_port}{path}",
                                json=body) as response:
            whole, done = await _sse(response)
            assert done and response.headers["X-Spotserve-Request-Id"]
            assert all(event_id is None for event_id, _ in whole)  # no opt-in, no ids
        async with session.post(f"http://127.0.0.1:{first.http_port}{path}", json=body,
                                headers={"X-Spotserve-Resumable": "true",
                                         "X-Request-Id": "http-1"}) as response:
            head, done = await _sse(response, stop_after=7)
            assert not done
            assert response.headers["X-Spotserve-Request-Id"] == "http-1"
        last = head[-1][0]
        assert last is not None and int(last) >= 7
        async with session.post(f"http://127.0.0.1:{second.http_port}{path}", json=body,
                                headers={"X-Spotserve-Resume": "http-1",
                                         "Last-Event-ID": last}) as response:
            assert response.status == 200
            tail, done = await _sse(response)
            assert done
    assert _text(head, chat) + _text(tail, chat) == _text(whole, chat)
    assert [e for e, _ in tail][-1] == str(TOKENS)
    if chat:   # the role comes once, in the stream's very first event
        roles = [d["choices"][0]["delta"].get("role") for _, d in head + tail]  # type: ignore[index]
        assert roles[0] == "assistant" and not any(roles[1:])
    assert tail[-1][1]["choices"][0]["finish_reason"] == "length"  # type: ignore[index]


async def test_http_resume_errors_are_clear(start_worker: StartWorker,
                                            start_router: StartRouter) -> None:
    first, _ = await _two_routers(start_worker, start_router)
    url = f"http://127.0.0.1:{first.http_port}/v1/completions"
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body, headers={"X-Spotserve-Resume": "nope"}) as r:
            assert r.status == 404
            assert "not held" in (await r.json())["error"]["message"]
        async with session.post(url, json=body, headers={"X-Spotserve-Resume": "nope",
                                                         "Last-Event-ID": "x1"}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["param"] == "Last-Event-ID"
        async with session.post(url, json=body,
                                headers={"X-Spotserve-Resumable": "maybe"}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["param"] == "X-Spotserve-Resumable"
        async with session.delete(
                f"http://127.0.0.1:{first.http_port}/v1/spotserve/requests/nope") as r:
            assert r.status == 404
