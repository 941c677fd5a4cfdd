"""Live migration between real worker processes on loopback, mid-generation, with every
Configure built as the controller builds it (migration plan → assignments → requests).

Epoch 1: one pipeline (P=1, M=2) on workers A and B serves three requests; after their
first tokens it is drained (2 more steps, KV kept: A and B each keep their KV heads).
Epoch 2 (D=2): pipeline 0 (P=1, M=1) on a new worker C inherits the three requests,
pulling its weights from A and B and each request's KV rank to rank, A's heads from A and
B's from B; pipeline 1 regroups A and B into (P=2, M=1), each keeping half of its new
weights and pulling the other half. The requests resume on C from that KV. Epoch 3: C is
drained in turn, and pipeline 1, unchanged, inherits its requests: A pulls the first
layers' KV from C and B the last ones, on their fast path, without stopping the request
they serve meanwhile. Every request's tokens equal an uninterrupted run's, and no request
re-prefills. Finally SIGTERM
stops every worker cleanly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from spotserve.layout import ParallelConfig, Position
from spotserve.model_spec import ModelSpec
from spotserve.v1 import common_pb2, worker_pb2
from tests.worker.cluster import (
    FR,
    META,
    Stream,
    Worker,
    configure_pipeline,
    spawn,
    submit_request,
)
from tests.worker.conftest import MAX_TOKENS, PROMPTS

pytestmark = pytest.mark.timeout(240)
KV = common_pb2.RESUME_MODE_KV


async def _drain(worker: Worker, streams: dict[str, Stream], steps: int
                 ) -> tuple[dict[str, list[int]], list[common_pb2.RequestProgress]]:
    await asyncio.wait_for(asyncio.gather(*(s.first.wait() for s in streams.values())), 60)
    drained = await worker.stub.Drain(worker_pb2.DrainRequest(steps=steps), metadata=META,
                                      timeout=60)
    before = {rid: await s.result() for rid, s in streams.items()}
    assert drained.steps_run == steps
    progress = {p.request_id: p for p in drained.requests}
    for rid, tokens in before.items():
        assert streams[rid].finish == FR.FINISH_REASON_PAUSED, rid
        assert 0 < len(tokens) < MAX_TOKENS, "the drain must interrupt every request"
        assert progress[rid].generated_tokens == len(tokens) and progress[rid].kv_kept
        assert progress[rid].kv_tokens == len(PROMPTS[rid]) + len(tokens) - 1
    return before, list(drained.requests)


async def test_kv_moves_rank_to_rank_across_layouts(
        checkpoint: Path, reference: Callable[[list[int], int], list[int]],
        tmp_path: Path) -> None:
    spec = ModelSpec.from_hf_config(checkpoint)
    a, b, c = await asyncio.gather(*(spawn(f"127.0.0.{i}", checkpoint, tmp_path)
                                     for i in (2, 3, 4)))
    layers = spec.num_layers
    single, staged = (ParallelConfig.uniform(layers, 1, p, m, batch=8).pipelines[0]
                      for p, m in ((1, 1), (2, 1)))
    try:
        # ---- epoch 1: (P=1, M=2) on A and B, from the checkpoint --------------------------
        old = ParallelConfig.uniform(layers, 1, 1, 2, batch=8)
        old_placement = {Position(0, 0, 0): a, Position(0, 0, 1): b}
        replies = await configure_pipeline(spec, 1, old, old_placement)
        assert all(r.bytes_from_checkpoint > 0 for r in replies)
        streams = {rid: Stream(a, submit_request(rid, PROMPTS[rid], MAX_TOKENS))
                   for rid in PROMPTS}
        before, drained = await _drain(a, streams, 2)
        assert (await a.status()).state == worker_pb2.WORKER_STATE_DRAINED

        # ---- epoch 2: C inherits the requests; A and B regroup as (P=2, M=1) --------------
        two = ParallelConfig((single, staged), batch=8)
        placement = {Position(0, 0, 0): c, Position(1, 0, 0): a, Position(1, 1, 0): b}
        c_reply, a_reply, b_reply = await configure_pipeline(
            spec, 2, two, placement, old=old, old_placement=old_placement,
            old_ids=["e1p0"], drained=drained)
        assert c_reply.bytes_pulled > 0 and c_reply.bytes_from_checkpoint == 0
        for reply in (a_reply, b_reply):
            assert reply.bytes_kept > 0 and reply.bytes_pulled > 0
            assert reply.bytes_from_checkpoint == 0
        resumed = {rid: Stream(c, submit_request(rid, PROMPTS[rid], MAX_TOKENS, before[rid],
                                                 KV)) for rid in PROMPTS}

        # ---- epoch 3: C drains; the unchanged (P=2) pipeline on A and B takes them over --
        # while serving a request of its own, through the Configure (it is pipeline 0 now,
        # not 1: a renumbering that must not stop it)
        own = next(iter(PROMPTS))
        serving = Stream(a, submit_request("own", PROMPTS[own], MAX_TOKENS))
        await asyncio.wait_for(serving.first.wait(), 60)
        again, drained = await _drain(c, resumed, 1)
        one = ParallelConfig((staged,), batch=8)
        replies = await configure_pipeline(
            spec, 3, one, {Position(0, 0, 0): a, Position(0, 1, 0): b}, old=two,
            old_placement=placement, old_ids=["e2p0", "e2p1"], drained=drained)
        for reply in replies:  # the fast path: weights kept, each rank's KV layers pulled
            assert reply.state == worker_pb2.WORKER_STATE_READY
            assert reply.bytes_kept > 0 and reply.bytes_pulled > 0
            assert reply.bytes_from_checkpoint == 0
        final = {rid: Stream(a, submit_request(rid, PROMPTS[rid], MAX_TOKENS, again[rid], KV))
                 for rid in PROMPTS}
        for rid, stream in final.items():
            assert await stream.result() == reference(PROMPTS[rid], MAX_TOKENS), rid
            assert stream.finish == FR.FINISH_REASON_LENGTH
        assert await serving.result() == reference(PROMPTS[own], MAX_TOKENS)
        assert serving.finish == FR.FINISH_REASON_LENGTH, "the fast path must not pause it"
        status = await a.status()
        assert status.state == worker_pb2.WORKER_STATE_READY and status.kv_blocks_used == 0
        resumed_by_kv = [line for line in a.log.read_text().splitlines()
                         if "cannot be adopted" in line]
        assert not resumed_by_kv, "every request must resume from KV, none re-prefill"
    finally:
        codes = await asyncio.gather(*(w.stop() for w in (a, b, c)))
    assert codes == [0, 0, 0], "SIGTERM must stop every worker cleanly"
