"""Paged attention equals plain attention over each sequence's own keys: decodes scored
block by block in place wherever the blocks lie, prefills and chunks after earlier
context, and mixed steps of both; a mixed step's memory follows its real tokens."""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spotserve.errors import SpotserveError
from spotserve.worker.model.attention import AttentionBatch, SequenceChunk, paged_attention

BLOCK, DIM = 4, 8

TABLES = {   # one decode step's block tables, by how they sit in the cache
    "packed": [[0, 1], [2], [3, 4, 5]],
    "scattered": [[7, 3], [12], [5, 0, 9]],        # a span with holes, read in place
    "sparse": [[60, 3], [31], [5, 0, 47]],         # too many holes: gathered instead
}


def _batch(tables: list[list[int]], contexts: list[int], window: int | None = None,
           new: list[int] | None = None) -> AttentionBatch:
    chunks = _chunks(tables, contexts, new)
    return AttentionBatch.build(chunks, BLOCK, sliding_window=window)


def _chunks(tables: list[list[int]], contexts: list[int], new: list[int] | None = None
            ) -> list[SequenceChunk]:
    new = new or [1] * len(tables)
    return [SequenceChunk(m, n, t) for m, n, t in zip(new, contexts, tables, strict=True)]


def _reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               chunks: list[SequenceChunk], window: int | None = None, scale: float = 0.3,
               block: int = BLOCK) -> torch.Tensor:
    """Textbook attention in float64, one sequence at a time: each query against its own
    sequence's keys up to its position (and within the window)."""
    heads, dim = q.shape[1:]
    group = heads // k_cache.shape[1]
    out, start = [], 0
    for c in chunks:
        slots = [(c.block_table[p // block], p % block) for p in range(c.context_len)]
        k = torch.stack([k_cache[b, :, o] for b, o in slots]).double()   # [ctx, kv, dim]
        v = torch.stack([v_cache[b, :, o] for b, o in slots]).double()
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        for i in range(c.num_new):
            pos = c.context_len - c.num_new + i
            seen = torch.arange(c.context_len) <= pos
            if window is not None:
                seen &= torch.arange(c.context_len) > pos - window
            scores = torch.einsum("hd,khd->hk", q[start + i].double(), k) * scale
            probs = scores.masked_fill(~seen, float("-inf")).softmax(-1)
            out.append(torch.einsum("hk,khd->hd", probs, v).reshape(heads * dim))
        start += c.num_new
    return torch.stack(out).to(q.dtype)


@pytest.mark.parametrize("layout", sorted(TABLES))
@pytest.mark.parametrize(("heads", "kv_heads", "window"), [(4, 4, None), (4, 2, None),
                                                            (6, 1, None), (4, 2, 3)])
def test_decode_matches_plain_attention(layout: str, heads: int, kv_heads: int,
                                        window: int | None) -> None:
    torch.manual_seed(0)
    tables = TABLES[layout]
    batch = _batch(tables, [7, 4, 9], window)   # block-aligned, and partly filled last blocks
    assert batch.decode is not None
    assert (batch.decode.span is None) == (layout == "sparse")
    k, v = torch.randn(64, kv_heads, BLOCK, DIM), torch.randn(64, kv_heads, BLOCK, DIM)
    q = torch.randn(3, heads, DIM)
    got = paged_attention(q, k, v, batch, 0.3)
    ref = _reference(q, k, v, _chunks(tables, [7, 4, 9]), window)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_decode_ignores_blocks_of_other_requests() -> None:
    """Blocks inside the span that this step does not use (other requests' or free ones)
    may hold any (finite) values."""
    torch.manual_seed(1)
    batch = _batch(TABLES["scattered"], [8, 3, 10])
    k, v = torch.randn(64, 2, BLOCK, DIM), torch.randn(64, 2, BLOCK, DIM)
    q = torch.randn(3, 4, DIM)
    before = paged_attention(q, k, v, batch, 0.3)
    for block in (1, 2, 4, 6, 8, 10, 11):
        k[block], v[block] = 1e4, -3e4
    torch.testing.assert_close(paged_attention(q, k, v, batch, 0.3), before)


def test_half_precision_decode_tracks_fp32() -> None:
    torch.manual_seed(2)
    batch = _batch(TABLES["scattered"], [7, 3, 9])
    k, v = torch.randn(16, 2, BLOCK, 16), torch.randn(16, 2, BLOCK, 16)
    q = torch.randn(3, 4, 16)
    ref = _reference(q, k, v, _chunks(TABLES["scattered"], [7, 3, 9]))
    got = paged_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), batch, 0.3)
    torch.testing.assert_close(got.float(), ref, rtol=0, atol=0.02)


def test_a_shared_block_is_refused() -> None:
    with pytest.raises(SpotserveError, match="twice"):
        _batch([[0, 1], [1]], [5, 2])


# a step with prompts arriving while others decode: (new tokens, context) per sequence
MIXED = {
    "prefill": [(9, 9)],
    "chunk after context": [(5, 11)],
    "prefills only": [(9, 9), (3, 3), (6, 10)],
    "equal prompts": [(6, 6), (6, 6), (6, 6), (1, 9), (6, 6)],   # 3 share one call
    "mixed": [(1, 7), (9, 9), (1, 4), (5, 11), (1, 12)],
}


@pytest.mark.parametrize("case", sorted(MIXED))
@pytest.mark.parametrize(("heads", "kv_heads", "window"), [(4, 4, None), (6, 2, None),
                                                            (4, 2, 3)])
def test_ragged_steps_match_plain_attention(case: str, heads: int, kv_heads: int,
                                            window: int | None) -> None:
    torch.manual_seed(3)
    shape = MIXED[case]
    blocks = torch.randperm(40).tolist()   # each sequence's blocks scattered in the cache
    tables, cursor = [], 0
    for _new, context in shape:
        n = -(-context // BLOCK)
        tables.append(blocks[cursor:cursor + n])
        cursor += n
    new, contexts = [m for m, _ in shape], [c for _, c in shape]
    batch = _batch(tables, contexts, window, new)
    assert sum(p.blocks.shape[0] for p in batch.prefills) == sum(m > 1 for m in new)
    if case == "equal prompts":
        assert [p.blocks.shape[0] for p in batch.prefills] == [3, 1]
    k, v = torch.randn(40, kv_heads, BLOCK, DIM), torch.randn(40, kv_heads, BLOCK, DIM)
    q = torch.randn(sum(new), heads, DIM)
    got = paged_attention(q, k, v, batch, 0.3)
    ref = _reference(q, k, v, _chunks(tables, contexts, new), window)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


class _PeakMemory(TorchDispatchMode):
    """The most bytes held at once by tensors created inside it (freed ones are given
    back when their storage is collected)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        out = func(*args, **(kwargs or {}))
        held = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in held or key in self.seen or storage.nbytes() == 0:
                continue
            self.seen.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.live -= nbytes


def test_mixed_step_memory_follows_real_tokens() -> None:
    """31 sequences decoding at 4k context while a 2,017-token prompt arrives: the step
    holds memory for its real queries and keys, not for 32 x 2,017 padded queries against
    32 x 4k keys (the padded layout's mask alone was 258 MB at this size)."""
    block, heads, kv_heads, dim, decode_ctx, prompt = 16, 4, 2, 16, 4096, 2017
    per_seq = decode_ctx // block
    chunks = [SequenceChunk(1, decode_ctx, range(s * per_seq, (s + 1) * per_seq))
              for s in range(31)]
    first = 31 * per_seq
    chunks.append(SequenceChunk(prompt, prompt, range(first, first + -(-prompt // block))))
    num_blocks = first + -(-prompt // block)
    k = torch.randn(num_blocks, kv_heads, block, dim)
    v = torch.randn(num_blocks, kv_heads, block, dim)
    tokens = 31 + prompt
    q = torch.randn(tokens, heads, dim)
    tracker = _PeakMemory()
    with tracker:
        batch = AttentionBatch.build(chunks, block)
        out = paged_attention(q, k, v, batch, dim ** -0.5)
    assert out.shape == (tokens, heads * dim)
    fp32 = 4
    # what the real work needs: scores of every query against the keys it may see, the
    # prompt's own keys and values gathered once, the outputs
    real_pairs = 31 * decode_ctx + prompt * prompt
    real = fp32 * (heads * real_pairs + 2 * kv_heads * prompt * dim + tokens * heads * dim)
    padded_mask = 32 * prompt * (decode_ctx + block)   # bytes of the old dense bool mask
    print(f"peak {tracker.peak / 1e6:.1f} MB, real {real / 1e6:.1f} MB, "
          f"old mask {padded_mask / 1e6:.0f} MB")
    assert tracker.peak <= 2 * real, (tracker.peak, real)
    assert tracker.peak < padded_mask / 2
    # and the prompt's rows are right (the decodes are checked above at small sizes)
    ref = _reference(q[31:31 + 8], k, v, [SequenceChunk(8, 8, chunks[-1].block_table)],
                     scale=dim ** -0.5, block=block)
    torch.testing.assert_close(out[31:31 + 8], ref, rtol=1e-4, atol=1e-5)
