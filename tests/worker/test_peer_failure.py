"""A pipeline whose peer dies or stops answering notices within its peer timeout, and a
healthy idle pipeline never does.

Two workers form one (P=2) pipeline with `--peer-timeout 1.5`. Killed (SIGKILL) or stopped
(SIGSTOP) at the worst moment, while a request decodes or while the pipeline idles, the
surviving rank must end the request's stream with an error (so the router can resume it
elsewhere), say why in `Status.pipeline_error`, fall back to STANDBY, and take a new role
at once. Bounds here only catch a hang (the torch default would wait 30 minutes); the
detection time itself is measured by the chaos campaign, not asserted.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from spotserve.layout import ParallelConfig, Position
from spotserve.model_spec import ModelSpec
from spotserve.v1 import common_pb2, worker_pb2
from tests.worker.cluster import Stream, Worker, configure_pipeline, spawn, submit_request
from tests.worker.conftest import PROMPTS

pytestmark = pytest.mark.timeout(180)
PEER_TIMEOUT = 1.5
HANG = 30.0  # far above the peer timeout, far below torch's default of 30 minutes
REPREFILL = common_pb2.RESUME_MODE_REPREFILL


async def _pipeline(checkpoint: Path, tmp: Path, hosts: tuple[str, str]
                    ) -> tuple[ModelSpec, Worker, Worker]:
    spec = ModelSpec.from_hf_config(checkpoint)
    a, b = await asyncio.gather(*(spawn(h, checkpoint, tmp, "--peer-timeout", str(PEER_TIMEOUT))
                                  for h in hosts))
    config = ParallelConfig.uniform(spec.num_layers, 1, 2, 1, batch=8)
    await configure_pipeline(spec, 1, config, {Position(0, 0, 0): a, Position(0, 1, 0): b})
    return spec, a, b


async def _broken(worker: Worker) -> worker_pb2.WorkerStatus:
    """The worker's status once it reports its pipeline broken (a hang fails the test)."""
    give_up = time.monotonic() + HANG
    while time.monotonic() < give_up:
        status = await worker.status()
        if status.pipeline_error:
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"{worker.address} never noticed its peer was gone")


async def _serves_alone(spec: ModelSpec, worker: Worker, epoch: int,
                        reference: Callable[[list[int], int], list[int]]) -> None:
    """The survivor takes a one-GPU role at once and serves a request exactly."""
    single = ParallelConfig.uniform(spec.num_layers, 1, 1, 1, batch=8)
    (reply,) = await asyncio.wait_for(
        configure_pipeline(spec, epoch, single, {Position(0, 0, 0): worker}), HANG)
    assert reply.state == worker_pb2.WORKER_STATE_READY
    assert not (await worker.status()).pipeline_error
    stream = Stream(worker, submit_request("after", PROMPTS["r2"], 12))
    assert await stream.result() == reference(PROMPTS["r2"], 12)


async def test_an_idle_pipeline_outlives_its_peer_timeout(
        checkpoint: Path, reference: Callable[[list[int], int], list[int]],
        tmp_path: Path) -> None:
    _, a, b = await _pipeline(checkpoint, tmp_path, ("127.0.0.40", "127.0.0.41"))
    try:
        await asyncio.sleep(4 * PEER_TIMEOUT)  # idle, well past the collectives' timeout
        for worker in (a, b):
            status = await worker.status()
            assert status.state == worker_pb2.WORKER_STATE_READY, worker.address
            assert not status.pipeline_error, status.pipeline_error
        stream = Stream(a, submit_request("r1", PROMPTS["r1"], 16))
        assert await stream.result() == reference(PROMPTS["r1"], 16)
    finally:
        await asyncio.gather(*(w.stop(timeout=15) for w in (a, b)))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
async def test_a_follower_lost_mid_request_ends_the_stream_with_an_error(
        sig: signal.Signals, checkpoint: Path,
        reference: Callable[[list[int], int], list[int]], tmp_path: Path) -> None:
    spec, a, b = await _pipeline(checkpoint, tmp_path, ("127.0.0.42", "127.0.0.43"))
    try:
        stream = Stream(a, submit_request("r1", PROMPTS["r1"], 200))
        await asyncio.wait_for(stream.first.wait(), 60)
        b.process.send_signal(sig)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream.result(timeout=HANG)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert 0 < len(stream.tokens) < 200
        status = await _broken(a)
        assert status.state == worker_pb2.WORKER_STATE_STANDBY
        # what it streamed before the break is a prefix of the uninterrupted output, and
        # the request continues elsewhere by re-prefill
        assert stream.tokens == reference(PROMPTS["r1"], 200)[:len(stream.tokens)]
        await _serves_alone(spec, a, 2, reference)
        resumed = Stream(a, submit_request("r1", PROMPTS["r1"], 40, stream.tokens[:20],
                                           REPREFILL))
        assert await resumed.result() == reference(PROMPTS["r1"], 40)
    finally:
        if sig == signal.SIGSTOP:
            b.process.send_signal(signal.SIGCONT)
        await asyncio.gather(*(w.stop(timeout=15) for w in (a, b)))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
async def test_a_follower_notices_its_idle_driver_is_gone(
        sig: signal.Signals, checkpoint: Path,
        reference: Callable[[list[int], int], list[int]], tmp_path: Path) -> None:
    spec, a, b = await _pipeline(checkpoint, tmp_path, ("127.0.0.44", "127.0.0.45"))
    try:
        a.process.send_signal(sig)
        status = await _broken(b)
        assert status.state == worker_pb2.WORKER_STATE_STANDBY
        await _serves_alone(spec, b, 2, reference)
    finally:
        if sig == signal.SIGSTOP:
            a.process.send_signal(signal.SIGCONT)
        await asyncio.gather(*(w.stop(timeout=15) for w in (a, b)))


async def test_a_newer_configure_ends_a_rendezvous_whose_peer_never_comes(
        checkpoint: Path, reference: Callable[[list[int], int], list[int]],
        tmp_path: Path) -> None:
    """Epoch 1 asks A to form a pipeline with a peer that died before it could join;
    epoch 2 (the controller re-planned) must not wait out the rendezvous timeout."""
    spec = ModelSpec.from_hf_config(checkpoint)
    a, b = await asyncio.gather(*(spawn(h, checkpoint, tmp_path, "--join-timeout", "60")
                                  for h in ("127.0.0.46", "127.0.0.47")))
    try:
        config = ParallelConfig.uniform(spec.num_layers, 1, 2, 1, batch=8)
        placement = {Position(0, 0, 0): a, Position(0, 1, 0): b}
        b.process.send_signal(signal.SIGKILL)  # dies before its Configure arrives
        stranded = asyncio.ensure_future(configure_pipeline(spec, 1, config, placement))
        for _ in range(100):   # A is in the rendezvous, waiting for B
            if (await a.status()).state == worker_pb2.WORKER_STATE_LOADING:
                break
            await asyncio.sleep(0.05)
        started = time.monotonic()
        await _serves_alone(spec, a, 2, reference)
        assert time.monotonic() - started < HANG  # not the 60 s join timeout
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stranded   # A's rendezvous was given up (or B's call found nobody)
        assert err.value.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE)
    finally:
        await asyncio.gather(*(w.stop(timeout=15) for w in (a, b)))
