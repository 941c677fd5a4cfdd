"""Property tests of the torch-free core: block manager and scheduler, driven by a fake
model whose next token depends only on (request, position)."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from spotserve.worker.engine.block_manager import BlockManager
from spotserve.worker.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from spotserve.worker.engine.sequence import (
    FinishReason,
    SamplingParams,
    Sequence,
    SequenceStatus,
)

EOS = 0


def fake_token(request_id: str, position: int) -> int:
    return (hash(request_id) % 97 + 7 * position) % 50 + 1   # never EOS


def _check_invariants(sched: Scheduler, out: SchedulerOutput) -> None:
    blocks, config = sched.blocks, sched.config
    tables = [b for s in sched.running for b in s.block_table]
    assert len(tables) == len(set(tables)), "a block is in two tables"
    assert len(tables) + blocks.num_free == blocks.num_blocks, "blocks leaked"
    assert all(not s.block_table and s.num_computed == 0 for s in sched.waiting)
    assert out.num_tokens <= config.max_batched_tokens
    assert len(out.chunks) <= config.max_num_seqs
    assert len({c.seq.request_id for c in out.chunks}) == len(out.chunks)
    for c in out.chunks:
        assert c.num_new >= 1 and c.seq.status is SequenceStatus.RUNNING
        assert len(c.seq.block_table) * blocks.block_size >= c.context_len
        assert c.context_len <= c.seq.num_tokens


requests = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12), st.integers(0, 6)),
                    min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(requests, st.integers(6, 40), st.integers(1, 8), st.integers(1, 6), st.integers(4, 64))
def test_every_request_finishes_with_the_same_tokens(reqs: list[tuple[int, int, int]],
                                                     num_blocks: int, block_size: int,
                                                     max_seqs: int, budget: int) -> None:
    blocks = BlockManager(num_blocks, block_size)
    sched = Scheduler(blocks, SchedulerConfig(max_seqs, budget, 4096), (EOS,))
    arrivals: dict[int, list[Sequence]] = {}
    seqs = []
    for i, (prompt_len, max_tokens, at) in enumerate(reqs):
        if blocks.blocks_for(prompt_len + max_tokens) > num_blocks:
            continue   # could never fit: the scheduler rejects it at `add`
        seq = Sequence(f"r{i}", list(range(1, prompt_len + 1)),
                       SamplingParams(max_tokens=max_tokens))
        arrivals.setdefault(at, []).append(seq)
        seqs.append(seq)
    finished: list[Sequence] = []
    for step in range(2000):
        for seq in arrivals.pop(step, []):
            sched.add(seq)
        if not sched.has_work and not arrivals:
            break
        out = sched.schedule()
        _check_invariants(sched, out)
        sampled = {c.seq.request_id: fake_token(c.seq.request_id, c.context_len)
                   for c in out.chunks if c.samples}
        finished += sched.update(out, sampled)
    assert sorted(s.request_id for s in finished) == sorted(s.request_id for s in seqs)
    assert blocks.num_free == num_blocks
    for seq in seqs:
        assert seq.finish_reason is FinishReason.LENGTH
        expected = [fake_token(seq.request_id, len(seq.prompt_token_ids) + k)
                    for k in range(seq.params.max_tokens)]
        assert seq.output_token_ids == expected



def test_the_lowest_free_blocks_go_first() -> None:
    """Blocks in use stay packed at the start of the cache (decode attention reads them as
    one span)."""
    blocks = BlockManager(8, 4)
    a, b, c = (Sequence(r, [1], SamplingParams()) for r in "abc")
    blocks.grow(a, 8)
    blocks.grow(b, 12)
    blocks.grow(c, 4)
    assert (a.block_table, b.block_table, c.block_table) == ([0, 1], [2, 3, 4], [5])
    blocks.free(b)
    blocks.grow(a, 16)
    blocks.grow(c, 12)
    assert (a.block_table, c.block_table) == ([0, 1, 2, 3], [5, 4, 6])

def test_preemption_by_recompute_frees_the_youngest() -> None:
    blocks = BlockManager(5, 2)
    sched = Scheduler(blocks, SchedulerConfig(8, 64, 4096))
    old, young = (Sequence(r, [1, 2, 3, 4], SamplingParams(max_tokens=8)) for r in "ab")
    sched.add(old)
    sched.add(young)
    out = sched.schedule()
    assert [c.num_new for c in out.chunks] == [4, 4] and blocks.num_free == 1
    sched.update(out, {"a": 5, "b": 6})
    out = sched.schedule()   # both need a third block; only one is free: "b" is preempted
    assert [c.seq.request_id for c in out.chunks] == ["a"]
    assert out.preempted == [young] and young.num_computed == 0
    assert young.output_token_ids == [6] and young.status is SequenceStatus.WAITING


def test_stop_conditions() -> None:
    sched = Scheduler(BlockManager(16, 4), SchedulerConfig(), eos_token_ids=(EOS,))
    cases = {"eos": SamplingParams(max_tokens=5), "stop": SamplingParams(stop_token_ids=(9,)),
             "ignore": SamplingParams(max_tokens=2, ignore_eos=True)}
    for rid, params in cases.items():
        sched.add(Sequence(rid, [1, 2], params))
    out = sched.schedule()
    done = sched.update(out, {"eos": EOS, "stop": 9, "ignore": EOS})
    assert {s.request_id: s.finish_reason for s in done} == {"eos": FinishReason.STOP,
                                                             "stop": FinishReason.STOP}
    done = sched.update(sched.schedule(), {"ignore": EOS})
    assert [(s.request_id, s.finish_reason) for s in done] == [("ignore", FinishReason.LENGTH)]


def test_draining_admits_nothing_new() -> None:
    sched = Scheduler(BlockManager(16, 4))
    sched.add(Sequence("a", [1], SamplingParams()))
    sched.update(sched.schedule(), {"a": 3})
    sched.admitting = False
    sched.add(Sequence("b", [1], SamplingParams()))
    assert [c.seq.request_id for c in sched.schedule().chunks] == ["a"]


def test_core_imports_no_torch() -> None:
    code = ("import sys; import spotserve.worker.engine.scheduler, "
            "spotserve.worker.engine.block_manager, spotserve.worker.engine.sequence, "
            "spotserve.worker.engine.plan; "
            "bad = {'torch', 'grpc', 'kopf', 'kubernetes'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
