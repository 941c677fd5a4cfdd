"""A source worker dies (SIGKILL) while a new worker pulls from it, or leaves (SIGTERM).

Epoch 1: (P=1, M=2) on A and B serves two requests and is drained mid-generation. A is a
slow sender (its outbound transfers are rate-limited), so when worker C starts pulling
its (P=1, M=1) weights and the requests' KV from A and B, A is killed mid-stream: C must
fail over to the checkpoint for the weights only A held, and become ready. Where A's share
of the KV did not get out before it died, the requests resumed on C from KV re-prefill
instead; either way their tokens are those of an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from spotserve.layout import ParallelConfig, Position
from spotserve.model_spec import ModelSpec
from spotserve.v1 import common_pb2, worker_pb2
from tests.worker.cluster import FR, META, Stream, configure_pipeline, spawn, submit_request
from tests.worker.conftest import MAX_TOKENS, PROMPTS

pytestmark = pytest.mark.timeout(240)
KV, REPREFILL = common_pb2.RESUME_MODE_KV, common_pb2.RESUME_MODE_REPREFILL


async def _kill_when_loading(victim: object, receiver: object) -> None:
    for _ in range(400):
        if (await receiver.status()).state == worker_pb2.WORKER_STATE_LOADING:  # type: ignore
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    victim.process.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]


async def test_sigkill_of_a_source_fails_over_to_the_checkpoint_then_reprefill(
        checkpoint: Path, reference: Callable[[list[int], int], list[int]],
        tmp_path: Path) -> None:
    spec = ModelSpec.from_hf_config(checkpoint)
    a, b, c = await asyncio.gather(
        spawn("127.0.0.5", checkpoint, tmp_path, "--send-limit-mbps", "0.05"),
        spawn("127.0.0.6", checkpoint, tmp_path), spawn("127.0.0.7", checkpoint, tmp_path))
    try:
        old = ParallelConfig.uniform(spec.num_layers, 1, 1, 2, batch=8)
        old_placement = {Position(0, 0, 0): a, Position(0, 0, 1): b}
        await configure_pipeline(spec, 1, old, old_placement)
        rids = ["r1", "r2"]
        streams = {rid: Stream(a, submit_request(rid, PROMPTS[rid], MAX_TOKENS)) for rid in rids}
        await asyncio.wait_for(asyncio.gather(*(s.first.wait() for s in streams.values())), 60)
        drained = await a.stub.Drain(worker_pb2.DrainRequest(steps=1), metadata=META,
                                     timeout=60)
        before = {rid: await s.result() for rid, s in streams.items()}
        assert all(0 < len(t) < MAX_TOKENS for t in before.values())

        single = ParallelConfig.uniform(spec.num_layers, 1, 1, 1, batch=8)
        configured, _ = await asyncio.gather(
            configure_pipeline(spec, 2, single, {Position(0, 0, 0): c}, old=old,
                               old_placement=old_placement, drained=list(drained.requests)),
            _kill_when_loading(a, c))
        assert await a.process.wait() == -signal.SIGKILL
        (reply,) = configured
        assert reply.state == worker_pb2.WORKER_STATE_READY
        assert reply.bytes_pulled > 0, "what B held comes from B"
        assert reply.bytes_from_checkpoint > 0, "what only A held comes from the checkpoint"
        # resumed from KV: where A's share did not get out before it died, C re-prefills
        resumed = {rid: Stream(c, submit_request(rid, PROMPTS[rid], MAX_TOKENS, before[rid],
                                                 KV)) for rid in rids}
        for rid, stream in resumed.items():
            assert await stream.result() == reference(PROMPTS[rid], MAX_TOKENS), rid
    finally:
        await asyncio.gather(*(w.stop(timeout=15) for w in (a, b, c)))


async def test_sigterm_on_a_follower_drains_its_pipeline_first(
        checkpoint: Path, reference: Callable[[list[int], int], list[int]],
        tmp_path: Path) -> None:
    """A follower's node is reclaimed (SIGTERM): it asks its driver to drain keeping each
    whole cache too (its own share leaves with it) and exits cleanly. The controller had
    planned to pull B's share from B; B is gone, so the new worker gets it from the
    driver's whole copy, and the request continues exactly from its KV."""
    spec = ModelSpec.from_hf_config(checkpoint)
    a, b, c = await asyncio.gather(spawn("127.0.0.12", checkpoint, tmp_path),
                                   spawn("127.0.0.13", checkpoint, tmp_path, "--grace", "0.5"),
                                   spawn("127.0.0.14", checkpoint, tmp_path))
    try:
        old = ParallelConfig.uniform(spec.num_layers, 1, 1, 2, batch=8)
        old_placement = {Position(0, 0, 0): a, Position(0, 0, 1): b}
        await configure_pipeline(spec, 1, old, old_placement)
        stream = Stream(a, submit_request("r1", PROMPTS["r1"], 240))
        await asyncio.wait_for(stream.first.wait(), 60)
        assert await b.stop(signal.SIGTERM, timeout=30) == 0
        before = await stream.result()
        assert stream.finish == FR.FINISH_REASON_PAUSED and 0 < len(before) < 240
        status = await a.status()
        assert status.state == worker_pb2.WORKER_STATE_DRAINED
        (progress,) = [p for p in status.requests if p.request_id == "r1"]
        single = ParallelConfig.uniform(spec.num_layers, 1, 1, 1, batch=8)
        (reply,) = await configure_pipeline(
            spec, 2, single, {Position(0, 0, 0): c}, old=old, old_placement=old_placement,
            doomed=[b], drained=[progress])   # planned before B was seen to be gone
        assert reply.bytes_from_checkpoint > 0 and reply.bytes_pulled > 0
        resumed = Stream(c, submit_request("r1", PROMPTS["r1"], 240, before, KV))
        assert await resumed.result() == reference(PROMPTS["r1"], 240)
        assert "cannot be adopted" not in c.log.read_text()
    finally:
        await asyncio.gather(*(w.stop(timeout=15) for w in (a, b, c)))


async def test_a_drain_takes_over_a_stopping_drivers_own_drain(
        checkpoint: Path, reference: Callable[[list[int], int], list[int]],
        tmp_path: Path) -> None:
    """A driver's node shuts down (GKE: SIGTERM comes with the notice): it drains itself,
    letting its request decode for part of its grace. The controller's Drain, a moment
    later, takes that drain over (stop now, KV kept) and the worker stays stopping; its
    KV can still be pulled, and the request continues exactly from it elsewhere."""
    spec = ModelSpec.from_hf_config(checkpoint)
    a, c = await asyncio.gather(spawn("127.0.0.15", checkpoint, tmp_path, "--grace", "8"),
                                spawn("127.0.0.16", checkpoint, tmp_path))
    try:
        old = ParallelConfig.uniform(spec.num_layers, 1, 1, 1, batch=8)
        old_placement = {Position(0, 0, 0): a}
        await configure_pipeline(spec, 1, old, old_placement)
        stream = Stream(a, submit_request("r1", PROMPTS["r1"], 240))
        await asyncio.wait_for(stream.first.wait(), 60)
        a.process.send_signal(signal.SIGTERM)
        for _ in range(100):
            if (await a.status()).state == worker_pb2.WORKER_STATE_STOPPING:
                break
            await asyncio.sleep(0.05)
        drained = await a.stub.Drain(worker_pb2.DrainRequest(steps=0), metadata=META,
                                     timeout=5)   # well before its own drain would end
        before = await stream.result()
        assert stream.finish == FR.FINISH_REASON_PAUSED and 0 < len(before) < 240
        assert (await a.status()).state == worker_pb2.WORKER_STATE_STOPPING
        (progress,) = drained.requests
        assert progress.kv_kept
        single = ParallelConfig.uniform(spec.num_layers, 1, 1, 1, batch=8)
        (reply,) = await configure_pipeline(
            spec, 2, single, {Position(0, 0, 0): c}, old=old, old_placement=old_placement,
            doomed=[a], drained=[progress])
        assert reply.bytes_pulled > 0
        resumed = Stream(c, submit_request("r1", PROMPTS["r1"], 240, before, KV))
        assert await resumed.result() == reference(PROMPTS["r1"], 240)
        assert "cannot be adopted" not in c.log.read_text()
    finally:
        await asyncio.gather(*(w.stop(timeout=30) for w in (a, c)))
