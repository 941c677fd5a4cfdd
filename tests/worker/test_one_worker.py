"""One real worker process serving a one-GPU pipeline.

Bad calls get clear gRPC errors and the worker keeps serving: missing token, unknown
request ids, out-of-range slices, oversized messages, invalid sampling and roles. Also:
cancellation and deadlines free the request's KV blocks; a drain by deadline pauses
requests with their KV kept and they resume on the same pipeline once a Configure that
keeps its role (the scale-out fast path) puts it back in service; the health check."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from spotserve.layout import ParallelConfig, Position
from spotserve.model_spec import ModelSpec
from spotserve.v1 import common_pb2, worker_pb2
from spotserve.worker import health
from tests.worker.cluster import (
    FR,
    META,
    Stream,
    Worker,
    configure_pipeline,
    configure_request,
    free_port,
    spawn,
    submit_request,
)
from tests.worker.conftest import MAX_TOKENS, PROMPTS

pytestmark = pytest.mark.timeout(180)
SC = grpc.StatusCode


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def worker(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[Worker]:
    spec = ModelSpec.from_hf_config(checkpoint)
    metrics = f"127.0.0.8:{free_port('127.0.0.8')}"
    w = await spawn("127.0.0.8", checkpoint, tmp_path_factory.mktemp("one"), "--metrics", metrics)
    w.metrics = metrics  # type: ignore[attr-defined]
    try:
        config = ParallelConfig.uniform(spec.num_layers, 1, 1, 1, batch=8)
        await configure_pipeline(spec, 1, config, {Position(0, 0, 0): w})
        yield w
    finally:
        await w.stop()


async def _error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        result = await call if not hasattr(call, "__aiter__") else [x async for x in call]
        del result
    return err.value


def _submit(w: Worker, request: worker_pb2.SubmitRequest, **kwargs: Any) -> Any:
    return w.stub.Submit(request, metadata=kwargs.pop("metadata", META), timeout=30, **kwargs)


def _kv(rid: str, layers: tuple[int, int] = (0, 1)) -> common_pb2.KVSlice:
    return common_pb2.KVSlice(request_id=rid, layer_start=layers[0], layer_end=layers[1],
                              head_start=0, head_stop=1, token_start=0, token_stop=1)


BAD_SUBMITS = {
    "empty prompt": (submit_request("x", [], 4), SC.INVALID_ARGUMENT, "prompt_token_ids"),
    "no max_tokens": (submit_request("x", [1, 2], 0), SC.INVALID_ARGUMENT, "max_tokens"),
    "token outside vocab": (submit_request("x", [1, 10_000], 4), SC.INVALID_ARGUMENT,
                            "token ids"),
    "too long": (submit_request("x", [1] * 500, 100), SC.INVALID_ARGUMENT, "context length"),
    "larger than the KV cache": (submit_request("x", [1] * 200, 100), SC.INVALID_ARGUMENT,
                                 "KV cache"),
    "no request id": (submit_request("", [1, 2], 4), SC.INVALID_ARGUMENT, "request_id"),
    "unknown request resumed from KV": (
        submit_request("ghost", [1, 2], 8, [3], common_pb2.RESUME_MODE_KV),
        SC.FAILED_PRECONDITION, "no KV cache"),
    "already complete": (submit_request("x", [1, 2], 2, [3, 4], common_pb2.RESUME_MODE_REPREFILL),
                         SC.INVALID_ARGUMENT, "already has"),
}


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", list(BAD_SUBMITS))
async def test_bad_submits(worker: Worker, case: str) -> None:
    request, code, text = BAD_SUBMITS[case]
    err = await _error(_submit(worker, request))
    assert err.code() == code and text in (err.details() or ""), err


@pytest.mark.asyncio(loop_scope="module")
async def test_bad_calls_get_clear_errors(worker: Worker, checkpoint: Path) -> None:
    stub = worker.stub
    err = await _error(stub.Status(worker_pb2.StatusRequest(), timeout=10))
    assert err.code() == SC.UNAUTHENTICATED
    err = await _error(stub.Status(worker_pb2.StatusRequest(), timeout=10,
                                   metadata=[("authorization", "Bearer wrong")]))
    assert err.code() == SC.UNAUTHENTICATED
    err = await _error(_submit(worker, submit_request("x", [1] * 6_000_000, 4)))
    assert err.code() == SC.RESOURCE_EXHAUSTED
    pulls = {
        "unknown KV request": (worker_pb2.PullTensorsRequest(kv=[_kv("ghost")]), SC.NOT_FOUND,
                               "no KV cache held"),
        "slice out of range": (worker_pb2.PullTensorsRequest(weights=[common_pb2.TensorSlice(
            tensor="model.norm.weight", dim=0, start=0, stop=10_000)]), SC.NOT_FOUND,
            "outside the held"),
        "unknown tensor": (worker_pb2.PullTensorsRequest(weights=[common_pb2.TensorSlice(
            tensor="nope", dim=-1)]), SC.NOT_FOUND, "not held"),
    }
    for name, (request, code, text) in pulls.items():
        err = await _error(stub.PullTensors(request, metadata=META, timeout=10))
        assert err.code() == code and text in (err.details() or ""), name
    err = await _error(stub.Drain(worker_pb2.DrainRequest(), metadata=META, timeout=10))
    assert err.code() == SC.INVALID_ARGUMENT and "steps or deadline" in (err.details() or "")
    err = await _error(stub.Drain(worker_pb2.DrainRequest(epoch=99, steps=0), metadata=META,
                                  timeout=10))
    assert err.code() == SC.FAILED_PRECONDITION and "epoch" in (err.details() or "")
    spec = ModelSpec.from_hf_config(checkpoint)
    config = ParallelConfig.uniform(spec.num_layers, 1, 1, 1, batch=8)
    bad_role = configure_request(spec, 2, config, Position(0, 0, 0), {Position(0, 0, 0): worker})
    bad_role.role.layer_end = bad_role.role.stages[0].layer_end = spec.num_layers - 1
    err = await _error(stub.Configure(bad_role, metadata=META, timeout=30))
    assert err.code() == SC.INVALID_ARGUMENT and "covers" in (err.details() or "")
    bad_source = configure_request(spec, 2, config, Position(0, 0, 0), {Position(0, 0, 0): worker})
    bad_source.weights.add(slice=common_pb2.TensorSlice(tensor="nope", dim=-1))
    err = await _error(stub.Configure(bad_source, metadata=META, timeout=30))
    assert err.code() == SC.INVALID_ARGUMENT and "not part of this role" in (err.details() or "")
    cancel = await stub.Cancel(worker_pb2.CancelRequest(request_id="ghost"), metadata=META)
    assert not cancel.found
    # ... and the worker still serves, in its epoch, with nothing left over
    status = await worker.status()
    assert status.state == worker_pb2.WORKER_STATE_READY and status.epoch == 1


@pytest.mark.asyncio(loop_scope="module")
async def test_serves_after_bad_calls(worker: Worker,
                                      reference: Callable[[list[int], int], list[int]]) -> None:
    stream = Stream(worker, submit_request("ok", PROMPTS["r1"], MAX_TOKENS))
    assert await stream.result() == reference(PROMPTS["r1"], MAX_TOKENS)
    assert stream.finish == FR.FINISH_REASON_LENGTH
    async with grpc.aio.insecure_channel(worker.address) as channel:
        assert await health.check(channel)                    # no token needed
        assert await health.check(channel, "spotserve.v1.Worker")


@pytest.mark.asyncio(loop_scope="module")
async def test_cancel_and_deadline_free_the_kv(worker: Worker) -> None:
    long = submit_request("long", PROMPTS["r2"], 240)
    stream = Stream(worker, long)
    await asyncio.wait_for(stream.first.wait(), 30)
    err = await _error(_submit(worker, long))
    assert err.code() == SC.ALREADY_EXISTS and "already running" in (err.details() or "")
    reply = await worker.stub.Cancel(worker_pb2.CancelRequest(request_id="long"),
                                     metadata=META)
    assert reply.found
    await stream.result()
    assert stream.finish == FR.FINISH_REASON_CANCELLED
    err = await _error(worker.stub.Submit(submit_request("late", PROMPTS["r2"], 240),
                                          metadata=META, timeout=0.05))
    assert err.code() == SC.DEADLINE_EXCEEDED
    for _ in range(100):
        status = await worker.status()
        if status.running == 0 and status.kv_blocks_used == 0:
            break
        await asyncio.sleep(0.05)
    assert status.running == 0 and status.kv_blocks_used == 0


@pytest.mark.asyncio(loop_scope="module")
async def test_a_detached_request_runs_on_and_attach_takes_its_stream_over(
        worker: Worker, reference: Callable[[list[int], int], list[int]]) -> None:
    """The router replica that submitted a detachable request dies: the driver runs it
    on; another replica finds it (Lookup) and takes it over (Attach), getting the request
    and every token so far, then the rest: all of it identical to an uninterrupted run."""
    tokens = 160
    request = submit_request("detached", PROMPTS["r3"], tokens)
    request.detachable = True
    call = _submit(worker, request)
    first = await call.read()
    assert first.token_ids
    call.cancel()                                   # its router went away
    await asyncio.sleep(0.2)
    found = await worker.stub.Lookup(worker_pb2.LookupRequest(request_id="detached"),
                                     metadata=META)
    assert found.found and not found.attached and found.generated_tokens >= 1
    attach = worker.stub.Attach(worker_pb2.AttachRequest(request_id="detached"),
                                metadata=META, timeout=60)
    head = await attach.read()
    assert head.position == 0 and list(head.request.prompt_token_ids) == PROMPTS["r3"]
    got = list(head.token_ids)
    assert len(got) >= found.generated_tokens
    finish = head.finish_reason
    while (delta := await attach.read()) is not grpc.aio.EOF:
        assert isinstance(delta, worker_pb2.TokenDelta) and delta.position == len(got)
        got.extend(delta.token_ids)
        finish = delta.finish_reason
    assert got == reference(PROMPTS["r3"], tokens)
    assert finish == FR.FINISH_REASON_LENGTH
    plain = submit_request("attached-to-its-stream", PROMPTS["r2"], tokens)
    call = _submit(worker, plain)
    await call.read()
    call.cancel()                                   # not detachable: cancelled with it
    err = await _error(worker.stub.Attach(worker_pb2.AttachRequest(
        request_id="attached-to-its-stream"), metadata=META, timeout=10))
    assert err.code() in (SC.NOT_FOUND, SC.FAILED_PRECONDITION)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_full_driver_refuses_fresh_requests_but_takes_resumed_ones(
        worker: Worker) -> None:
    """Router replicas each count only their own requests; the driver counts them all:
    beyond its batch cap (8 here) a fresh submission is RESOURCE_EXHAUSTED, so the
    replica tries another pipeline; a resumed one keeps the place it had."""
    streams = [Stream(worker, submit_request(f"full-{i}", PROMPTS["r2"], 120))
               for i in range(8)]
    deadline = time.monotonic() + 60
    while True:   # all 8 taken by the driver (running, or waiting for KV blocks)
        status = await worker.status()
        if status.running + status.waiting == 8:
            break
        assert time.monotonic() < deadline, f"the driver took {status.running} + {status.waiting}"
        await asyncio.sleep(0.05)
    err = await _error(_submit(worker, submit_request("one-too-many", PROMPTS["r1"], 4)))
    assert err.code() == SC.RESOURCE_EXHAUSTED and "full" in (err.details() or "")
    resumed = Stream(worker, submit_request("resumed", PROMPTS["r1"], 4, [7],
                                            common_pb2.RESUME_MODE_REPREFILL))
    assert len(await resumed.result()) == 4
    for i in range(8):
        await worker.stub.Cancel(worker_pb2.CancelRequest(request_id=f"full-{i}"),
                                 metadata=META)
    for stream in streams:
        await stream.result()
    assert len(await Stream(worker, submit_request("room-again", PROMPTS["r1"], 2)).result()) == 2


@pytest.mark.asyncio(loop_scope="module")
async def test_scale_out_fast_path_keeps_serving(
        worker: Worker, checkpoint: Path,
        reference: Callable[[list[int], int], list[int]]) -> None:
    """A Configure that leaves the worker's role and group as they are (a new epoch that
    only adds pipelines elsewhere) moves the epoch on without disturbing its requests."""
    spec = ModelSpec.from_hf_config(checkpoint)
    config = ParallelConfig.uniform(spec.num_layers, 1, 1, 1, batch=8)
    stream = Stream(worker, submit_request("steady", PROMPTS["r3"], 200))
    await asyncio.wait_for(stream.first.wait(), 30)
    here = {Position(0, 0, 0): worker}
    # the pipeline formed in epoch 1 carries over unchanged: same id, same group
    same = configure_request(spec, 7, config, Position(0, 0, 0), here, old=config,
                             old_placement=here, old_ids=["e1p0"])
    reply = await worker.stub.Configure(same, metadata=META, timeout=30)
    assert reply.state == worker_pb2.WORKER_STATE_READY and reply.bytes_pulled == 0
    assert reply.bytes_kept > 0 and reply.bytes_from_checkpoint == 0
    assert not stream.task.done(), "the request must still be running during the Configure"
    assert await stream.result() == reference(PROMPTS["r3"], 200)
    assert stream.finish == FR.FINISH_REASON_LENGTH
    assert (await worker.status()).epoch == 7


@pytest.mark.asyncio(loop_scope="module")
async def test_a_new_batch_size_applies_on_the_fast_path(
        worker: Worker, checkpoint: Path,
        reference: Callable[[list[int], int], list[int]]) -> None:
    """A new plan may resize an unchanged pipeline's batch: the worker keeps serving (its
    request is not paused) and takes at most the new number of requests at once."""
    spec = ModelSpec.from_hf_config(checkpoint)
    here = {Position(0, 0, 0): worker}
    wide, narrow = (ParallelConfig.uniform(spec.num_layers, 1, 1, 1, batch=b) for b in (8, 1))
    first = Stream(worker, submit_request("first", PROMPTS["r3"], 60))
    await asyncio.wait_for(first.first.wait(), 30)
    resize = configure_request(spec, 8, narrow, Position(0, 0, 0), here, old=wide,
                               old_placement=here, old_ids=["e1p0"])
    reply = await worker.stub.Configure(resize, metadata=META, timeout=30)
    assert reply.state == worker_pb2.WORKER_STATE_READY and reply.bytes_pulled == 0
    assert not first.task.done(), "the request must still be running after the Configure"
    # the driver now takes one request at a time: a second one is refused (the router
    # sends it to another pipeline, or re-admits it here once a place frees)
    err = await _error(_submit(worker, submit_request("later0", PROMPTS["r3"], 60)))
    assert err.code() == SC.RESOURCE_EXHAUSTED and "batch cap is 1" in (err.details() or "")
    busiest = 0
    while not first.task.done():
        busiest = max(busiest, (await worker.status()).running)
        await asyncio.sleep(0.02)
    assert busiest == 1
    assert await first.result() == reference(PROMPTS["r3"], 60)
    later = Stream(worker, submit_request("later1", PROMPTS["r3"], 60))
    assert await later.result() == reference(PROMPTS["r3"], 60)
    assert later.finish == FR.FINISH_REASON_LENGTH
    back = configure_request(spec, 9, wide, Position(0, 0, 0), here, old=narrow,
                             old_placement=here, old_ids=["e1p0"])
    await worker.stub.Configure(back, metadata=META, timeout=30)


@pytest.mark.asyncio(loop_scope="module")
async def test_drain_by_deadline_then_resume_here_from_the_kept_kv(
        worker: Worker, checkpoint: Path,
        reference: Callable[[list[int], int], list[int]]) -> None:
    spec = ModelSpec.from_hf_config(checkpoint)
    status = await worker.status()
    streams = {rid: Stream(worker, submit_request(rid, PROMPTS[rid], 200)) for rid in PROMPTS}
    await asyncio.wait_for(asyncio.gather(*(s.first.wait() for s in streams.values())), 30)
    deadline = time.time() + 0.05
    drained = await worker.stub.Drain(worker_pb2.DrainRequest(deadline_unix=deadline),
                                      metadata=META, timeout=30)
    assert time.time() < deadline + 1.0
    before = {rid: await s.result() for rid, s in streams.items()}
    assert all(s.finish == FR.FINISH_REASON_PAUSED for s in streams.values())
    assert all(0 < len(tokens) < 200 for tokens in before.values())
    assert {p.request_id for p in drained.requests} == set(PROMPTS)
    err = await _error(_submit(worker, submit_request("new", [1, 2], 4)))
    assert err.code() == SC.UNAVAILABLE and "DRAINED" in (err.details() or "")
    config = ParallelConfig.uniform(spec.num_layers, 1, 1, 1, batch=8)
    here = {Position(0, 0, 0): worker}
    same = configure_request(spec, status.epoch + 1, config, Position(0, 0, 0), here,
                             old=config, old_placement=here, old_ids=["e1p0"])
    reply = await worker.stub.Configure(same, metadata=META, timeout=30)
    assert reply.state == worker_pb2.WORKER_STATE_READY
    resumed = {rid: Stream(worker, submit_request(rid, PROMPTS[rid], 200, before[rid],
                                                  common_pb2.RESUME_MODE_KV))
               for rid in PROMPTS}
    for rid, stream in resumed.items():
        assert await stream.result() == reference(PROMPTS[rid], 200), rid


@pytest.mark.asyncio(loop_scope="module")
async def test_standby_keeps_weights_then_preload_and_rejoin(
        worker: Worker, checkpoint: Path,
        reference: Callable[[list[int], int], list[int]]) -> None:
    """Standby leaves the pipeline but keeps the weights for peers; a preload gathers a
    future role without joining; the Configure that follows uses what was preloaded."""
    spec = ModelSpec.from_hf_config(checkpoint)
    reply = await worker.stub.Configure(worker_pb2.ConfigureRequest(epoch=20), metadata=META,
                                        timeout=30)
    assert reply.state == worker_pb2.WORKER_STATE_STANDBY
    err = await _error(_submit(worker, submit_request("x", [1, 2], 4)))
    assert err.code() == SC.FAILED_PRECONDITION and "not a pipeline driver" in err.details()
    pulled = [c async for c in worker.stub.PullTensors(worker_pb2.PullTensorsRequest(
        weights=[common_pb2.TensorSlice(tensor="model.norm.weight", dim=-1)]), metadata=META)]
    assert sum(len(c.data) for c in pulled) == spec.hidden_size * 4
    config = ParallelConfig.uniform(spec.num_layers, 1, 1, 1, batch=8)
    request = configure_request(spec, 21, config, Position(0, 0, 0), {Position(0, 0, 0): worker})
    del request.weights[:]   # unnamed sources: kept when held, else the checkpoint
    request.preload_only = True
    reply = await worker.stub.Configure(request, metadata=META, timeout=30)
    assert reply.state == worker_pb2.WORKER_STATE_STANDBY and reply.bytes_kept > 0
    request.preload_only = False
    reply = await worker.stub.Configure(request, metadata=META, timeout=30)
    assert reply.state == worker_pb2.WORKER_STATE_READY
    assert reply.bytes_pulled == reply.bytes_from_checkpoint == 0
    stream = Stream(worker, submit_request("again", PROMPTS["r2"], MAX_TOKENS))
    assert await stream.result() == reference(PROMPTS["r2"], MAX_TOKENS)


@pytest.mark.asyncio(loop_scope="module")
async def test_prometheus_metrics(worker: Worker) -> None:
    def scrape() -> str:
        with urllib.request.urlopen(f"http://{worker.metrics}/metrics", timeout=10) as reply:  # type: ignore[attr-defined]
            return str(reply.read().decode())

    text = await asyncio.to_thread(scrape)
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("spotserve_worker_")}
    assert values["spotserve_worker_decode_steps_total"] > 0
    assert values['spotserve_worker_bytes_in_total{source="checkpoint"}'] > 0
    assert values["spotserve_worker_bytes_out_total"] > 0      # the standby test's pull
    assert values["spotserve_worker_running_requests"] == 0
    assert values["spotserve_worker_kv_blocks_total"] == 64
    assert "spotserve_worker_transfer_seconds_count" in values
    # vLLM's KV gauge (issue 15, item 6): a fraction, labelled with the model's name
    from prometheus_client.parser import text_string_to_metric_families
    (usage,) = [f for f in text_string_to_metric_families(text)
                if f.name == "vllm:kv_cache_usage_perc"]
    assert usage.type == "gauge"
    (sample,) = usage.samples
    assert set(sample.labels) == {"model_name"} and sample.labels["model_name"]
    assert 0.0 <= sample.value <= 1.0
