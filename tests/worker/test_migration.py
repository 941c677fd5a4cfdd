"""Live migration between real worker processes on loopback, mid-generation.

Epoch 1: one pipeline (P=1, M=2) on workers A and B serves three requests. After their
first tokens it is drained (2 more steps, KV kept). Epoch 2 (D=2): a new worker C takes
r1 and r2 as (P=1, M=1), pulling its weights from A and B and the two requests' KV from A;
A and B regroup into (P=2, M=1), each keeping half of its new weights and pulling the
other half from the other, and resume r3 from the KV A kept. Every request's tokens must
equal an uninterrupted run's. Finally SIGTERM stops every worker cleanly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from spotserve.layout import ParallelConfig, Position
from spotserve.model_spec import ModelSpec
from spotserve.v1 import common_pb2, worker_pb2
from spotserve.worker.sources import kv_imports
from tests.worker.cluster import (
    FR,
    META,
    Stream,
    configure_pipeline,
    spawn,
    submit_request,
)
from tests.worker.conftest import MAX_TOKENS, PROMPTS

pytestmark = pytest.mark.timeout(240)
KV = common_pb2.RESUME_MODE_KV


async def test_migrate_m2_to_a_third_worker_and_p1m2_to_p2m1(
        checkpoint: Path, reference: Callable[[list[int], int], list[int]],
        tmp_path: Path) -> None:
    spec = ModelSpec.from_hf_config(checkpoint)
    a, b, c = await asyncio.gather(*(spawn(f"127.0.0.{i}", checkpoint, tmp_path)
                                     for i in (2, 3, 4)))
    try:
        # ---- epoch 1: (P=1, M=2) on A and B, from the checkpoint --------------------------
        old = ParallelConfig.uniform(spec.num_layers, 1, 1, 2, batch=8)
        old_placement = {Position(0, 0, 0): a, Position(0, 0, 1): b}
        replies = await configure_pipeline(spec, 1, old, old_placement)
        assert all(r.bytes_from_checkpoint > 0 for r in replies)
        streams = {rid: Stream(a, submit_request(rid, PROMPTS[rid], MAX_TOKENS))
                   for rid in PROMPTS}
        await asyncio.wait_for(asyncio.gather(*(s.first.wait() for s in streams.values())), 60)
        drained = await a.stub.Drain(worker_pb2.DrainRequest(epoch=1, steps=2), metadata=META,
                                     timeout=60)
        before = {rid: await s.result() for rid, s in streams.items()}
        assert drained.steps_run == 2
        progress = {p.request_id: p for p in drained.requests}
        for rid, tokens in before.items():
            assert streams[rid].finish == FR.FINISH_REASON_PAUSED, rid
            assert 0 < len(tokens) < MAX_TOKENS, "the drain must interrupt every request"
            assert progress[rid].generated_tokens == len(tokens) and progress[rid].kv_kept
            assert progress[rid].kv_tokens == len(PROMPTS[rid]) + len(tokens) - 1
        assert (await a.status()).state == worker_pb2.WORKER_STATE_DRAINED

        # ---- epoch 2, pipeline 0: (P=1, M=1) on C, r1 and r2 move there with their KV ----
        single = ParallelConfig.uniform(spec.num_layers, 1, 1, 1, batch=8)
        imports = kv_imports(spec, [progress["r1"], progress["r2"]], [a.address])
        (c_reply,) = await configure_pipeline(spec, 2, single, {Position(0, 0, 0): c},
                                              old=old, old_placement=old_placement,
                                              kv_imports=imports)
        assert c_reply.bytes_pulled > 0 and c_reply.bytes_from_checkpoint == 0

        # ---- epoch 2, pipeline 1: A and B regroup into (P=2, M=1), r3 stays on A ---------
        staged = ParallelConfig.uniform(spec.num_layers, 1, 2, 1, batch=8)
        a_reply, b_reply = await configure_pipeline(
            spec, 2, staged, {Position(0, 0, 0): a, Position(0, 1, 0): b}, old=old,
            old_placement=old_placement)
        for reply in (a_reply, b_reply):
            assert reply.bytes_kept > 0 and reply.bytes_pulled > 0
            assert reply.bytes_from_checkpoint == 0

        resumed = {rid: Stream(c if rid != "r3" else a,
                               submit_request(rid, PROMPTS[rid], MAX_TOKENS, before[rid], KV))
                   for rid in PROMPTS}
        for rid, stream in resumed.items():
            assert await stream.result() == reference(PROMPTS[rid], MAX_TOKENS), rid
            assert stream.finish == FR.FINISH_REASON_LENGTH
        status = await c.status()
        assert status.state == worker_pb2.WORKER_STATE_READY and status.kv_blocks_used == 0
    finally:
        codes = await asyncio.gather(*(w.stop() for w in (a, b, c)))
    assert codes == [0, 0, 0], "SIGTERM must stop every worker cleanly"
