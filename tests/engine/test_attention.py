"""Decode attention scored block by block in place equals attention over the gathered,
padded keys (the prefill path, SDPA), wherever the blocks lie in the cache."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from spotserve.errors import SpotserveError
from spotserve.worker.model.attention import AttentionBatch, SequenceChunk, paged_attention

BLOCK, DIM = 4, 8

TABLES = {   # one decode step's block tables, by how they sit in the cache
    "packed": [[0, 1], [2], [3, 4, 5]],
    "scattered": [[7, 3], [12], [5, 0, 9]],        # a span with holes, read in place
    "sparse": [[60, 3], [31], [5, 0, 47]],         # too many holes: gathered instead
}


def _batch(tables: list[list[int]], contexts: list[int], window: int | None = None
           ) -> AttentionBatch:
    chunks = [SequenceChunk(1, n, t) for n, t in zip(contexts, tables, strict=True)]
    return AttentionBatch.build(chunks, BLOCK, sliding_window=window)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch
               ) -> torch.Tensor:
    return paged_attention(q, k, v, replace(batch, decode=None), 0.3)


@pytest.mark.parametrize("layout", sorted(TABLES))
@pytest.mark.parametrize(("heads", "kv_heads", "window"), [(4, 4, None), (4, 2, None),
                                                            (6, 1, None), (4, 2, 3)])
def test_decode_matches_padded_attention(layout: str, heads: int, kv_heads: int,
                                         window: int | None) -> None:
    torch.manual_seed(0)
    tables = TABLES[layout]
    batch = _batch(tables, [7, 4, 9], window)   # block-aligned, and partly filled last blocks
    assert batch.decode is not None
    assert (batch.decode.span is None) == (layout == "sparse")
    k, v = torch.randn(64, kv_heads, BLOCK, DIM), torch.randn(64, kv_heads, BLOCK, DIM)
    q = torch.randn(3, heads, DIM)
    got = paged_attention(q, k, v, batch, 0.3)
    torch.testing.assert_close(got, _reference(q, k, v, batch), rtol=1e-5, atol=1e-6)


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
    ref = _reference(q, k, v, batch)
    got = paged_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), batch, 0.3)
    torch.testing.assert_close(got.float(), ref, rtol=0, atol=0.02)


def test_a_shared_block_is_refused() -> None:
    with pytest.raises(SpotserveError, match="twice"):
        _batch([[0, 1], [1]], [5, 2])
