"""Loopback integration: requests survive a pipeline killed mid-stream, removed by the
controller, or drained with its KV migrated — with output identical to an uninterrupted
run — and fail clearly when they cannot resume in time."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from spotserve.operator.router.dispatch import Pipeline, PipelineState
from spotserve.operator.router.topology import ResumeHint
from spotserve.tokenizer import ModelTokenizer
from spotserve.v1 import common_pb2, control_pb2, worker_pb2, worker_pb2_grpc

from .conftest import StartRouter, StartWorker
from .helpers import AUTH, Streamed, control, expected, generate

pytestmark = pytest.mark.asyncio
PROMPTS = [f"preemption is invisible {i}" for i in range(8)]
TOKENS = 60


async def _wait_for_progress(app, tokens: int, count: int) -> None:  # type: ignore[no-untyped-def]
    for _ in range(500):
        progress = app.router.stats().requests
        if len(progress) >= count and all(p.generated_tokens >= tokens for p in progress):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("requests made no progress")


def _check_identical(results: list[Streamed], tokenizer: ModelTokenizer) -> None:
    for prompt, out in zip(PROMPTS, results, strict=True):
        ids, text = expected(tokenizer, prompt, TOKENS)
        assert out.token_ids == ids, prompt
        assert out.text == text, prompt
        assert out.finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_pipeline_killed_mid_stream_loses_nothing(start_worker: StartWorker,
                                                        start_router: StartRouter,
                                                        tokenizer: ModelTokenizer) -> None:
    victim, victim_server, a = await start_worker("127.0.0.2", step_seconds=0.01)
    survivor, _, b = await start_worker("127.0.0.3", step_seconds=0.01)
    app = await start_router([Pipeline("p0", a), Pipeline("p1", b)])
    tasks = [asyncio.create_task(generate(app, p, TOKENS)) for p in PROMPTS]
    await _wait_for_progress(app, 5, len(PROMPTS))
    assert victim.running, "dispatch should have used both pipelines"
    killed = set(victim.running)
    await victim_server.stop(0)  # no notice: the driver just dies
    results = await asyncio.gather(*tasks)
    _check_identical(results, tokenizer)
    resumed = {s.request_id for s in survivor.submissions
               if s.mode == common_pb2.RESUME_MODE_REPREFILL and s.resumed_at > 0}
    assert killed <= resumed
    stats = app.router.stats()
    assert stats.completed == len(PROMPTS) and stats.failed == 0


async def test_pipeline_gone_by_topology_resumes_by_reprefill(
        start_worker: StartWorker, start_router: StartRouter,
        tokenizer: ModelTokenizer) -> None:
    doomed, _, a = await start_worker("127.0.0.2", step_seconds=0.01)
    survivor, _, b = await start_worker("127.0.0.3", step_seconds=0.01)
    app = await start_router([Pipeline("p0", a), Pipeline("p1", b)])
    tasks = [asyncio.create_task(generate(app, p, TOKENS)) for p in PROMPTS]
    await _wait_for_progress(app, 5, len(PROMPTS))
    moved = set(doomed.running)
    channel, stub = control(app)
    ack = await stub.UpdateTopology(control_pb2.Topology(epoch=2, pipelines=[
        control_pb2.PipelineInfo(id="p0", driver_address=a,
                                 state=control_pb2.PIPELINE_STATE_GONE),
        control_pb2.PipelineInfo(id="p1", driver_address=b, capacity=1.0,
                                 state=control_pb2.PIPELINE_STATE_SERVING)]), metadata=AUTH)
    assert ack.epoch == 2
    results = await asyncio.gather(*tasks)
    await channel.close()
    _check_identical(results, tokenizer)
    assert moved and moved <= {s.request_id for s in survivor.submissions if s.resumed_at}
    assert not doomed.running  # the router cancelled its streams there


async def test_draining_pipeline_resumes_from_migrated_kv(
        start_worker: StartWorker, start_router: StartRouter,
        tokenizer: ModelTokenizer) -> None:
    source, _, a = await start_worker("127.0.0.2", step_seconds=0.01)
    target, _, b = await start_worker("127.0.0.3", step_seconds=0.01)
    app = await start_router([Pipeline("p0", a)])
    tasks = [asyncio.create_task(generate(app, p, TOKENS)) for p in PROMPTS[:4]]
    await _wait_for_progress(app, 5, 4)
    # The controller: drain p0 (4 more steps, KV kept), migrate its KV to p1, tell the router.
    async with grpc.aio.insecure_channel(a) as channel:
        await worker_pb2_grpc.WorkerStub(channel).Drain(worker_pb2.DrainRequest(steps=4),
                                                        metadata=AUTH)
    await app.router.update_topology(2, [Pipeline("p0", a, state=PipelineState.DRAINING),
                                         Pipeline("p1", b)], [])
    while len(source.kv) < 4:
        await asyncio.sleep(0.01)
    for _ in range(200):  # the controller sees which requests wait with their KV kept
        if sum(p.kv_kept for p in app.router.stats().requests) == 4:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("Stats does not show the paused requests")
    target.kv.update(source.kv)
    source.kv.clear()
    hints = [ResumeHint(rid, "p1", "kv") for rid in target.kv]
    await app.router.update_topology(3, [Pipeline("p0", a, state=PipelineState.GONE),
                                         Pipeline("p1", b)], hints)
    results = await asyncio.gather(*tasks)
    for prompt, out in zip(PROMPTS[:4], results, strict=True):
        ids, text = expected(tokenizer, prompt, TOKENS)
        assert out.token_ids == ids and out.text == text
    modes = {s.request_id: s.mode for s in target.submissions}
    assert set(modes.values()) == {common_pb2.RESUME_MODE_KV} and len(modes) == 4
    assert 'spotserve_requests_resumed_total{mode="kv"} 4.0' in \
        app.router.metrics.render().decode()


async def test_kv_resume_falls_back_to_reprefill_when_the_kv_is_missing(
        start_worker: StartWorker, start_router: StartRouter,
        tokenizer: ModelTokenizer) -> None:
    _source, _, a = await start_worker("127.0.0.2", step_seconds=0.01)
    target, _, b = await start_worker("127.0.0.3", step_seconds=0.01)
    app = await start_router([Pipeline("p0", a)])
    task = asyncio.create_task(generate(app, PROMPTS[0], TOKENS, request_id="r0"))
    await _wait_for_progress(app, 5, 1)
    await app.router.update_topology(2, [Pipeline("p0", a, state=PipelineState.DRAINING),
                                         Pipeline("p1", b)], [ResumeHint("r0", "p1", "kv")])
    async with grpc.aio.insecure_channel(a) as channel:
        await worker_pb2_grpc.WorkerStub(channel).Drain(worker_pb2.DrainRequest(steps=2),
                                                        metadata=AUTH)
    out = await task  # the KV never reached p1: FAILED_PRECONDITION, then re-prefill
    ids, text = expected(tokenizer, PROMPTS[0], TOKENS)
    assert out.token_ids == ids and out.text == text
    assert [s.mode for s in target.submissions] == [common_pb2.RESUME_MODE_REPREFILL]


async def test_request_that_cannot_resume_fails_clearly(start_worker: StartWorker,
                                                        start_router: StartRouter) -> None:
    _, server, a = await start_worker("127.0.0.2", step_seconds=0.01)
    app = await start_router([Pipeline("p0", a)], resume_timeout=0.5)
    task = asyncio.create_task(generate(app, PROMPTS[0], TOKENS))
    await _wait_for_progress(app, 3, 1)
    await server.stop(0)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await task
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "could not resume" in (info.value.details() or "")
    assert app.router.stats().failed == 1


async def test_called_off_drain_resumes_from_kv_on_the_same_pipeline(
        start_worker: StartWorker, start_router: StartRouter,
        tokenizer: ModelTokenizer) -> None:
    worker, _, a = await start_worker("127.0.0.2", step_seconds=0.01)
    app = await start_router([Pipeline("p0", a)])
    task = asyncio.create_task(generate(app, PROMPTS[1], TOKENS))
    await _wait_for_progress(app, 5, 1)
    async with grpc.aio.insecure_channel(a) as channel:
        await worker_pb2_grpc.WorkerStub(channel).Drain(worker_pb2.DrainRequest(steps=3),
                                                        metadata=AUTH)
    worker.drained = False  # the controller changed its mind; p0 never left SERVING
    out = await task
    ids, text = expected(tokenizer, PROMPTS[1], TOKENS)
    assert out.token_ids == ids and out.text == text
    assert [s.mode for s in worker.submissions] == [0, common_pb2.RESUME_MODE_KV]


async def test_reprefill_hint_names_the_pipeline(start_worker: StartWorker,
                                                 start_router: StartRouter,
                                                 tokenizer: ModelTokenizer) -> None:
    _, _, a = await start_worker("127.0.0.2", step_seconds=0.01)
    other, _, b = await start_worker("127.0.0.3", step_seconds=0.01)
    chosen, _, c = await start_worker("127.0.0.4", step_seconds=0.01)
    app = await start_router([Pipeline("p0", a)])
    task = asyncio.create_task(generate(app, PROMPTS[2], TOKENS, request_id="r2"))
    await _wait_for_progress(app, 5, 1)
    await app.router.update_topology(2, [Pipeline("p0", a, state=PipelineState.GONE),
                                         Pipeline("p1", b, capacity=10.0), Pipeline("p2", c)],
                                     [ResumeHint("r2", "p2", "reprefill")])
    out = await task
    assert out.token_ids == expected(tokenizer, PROMPTS[2], TOKENS)[0]
    assert not other.submissions
    assert [s.mode for s in chosen.submissions] == [common_pb2.RESUME_MODE_REPREFILL]
