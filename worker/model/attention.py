"""Attention over a paged KV cache for a batch of sequences of mixed lengths.

The cache of one layer is a pair of tensors [num_blocks, kv_heads, block_size, head_dim]:
heads stay a separate axis, so a slice by layer, head range and token range can be read
or written without touching the rest, and within a block each head's keys are contiguous.

Tokens travel flat ([tokens, ...]) through the linear layers. Two ways to attend:

- decode (every sequence brings one new token): the cache is never copied. Each block in
  use is scored in place against the query of the sequence that owns it (queries are
  gathered to blocks, not blocks to sequences: a query is `block_size` times smaller than
  a block). Only the scores and per-block outputs, which are small, move: scores to a
  [sequence, keys] layout for the softmax, probabilities back to blocks, per-block outputs
  summed per sequence in block-table order. Memory traffic is one read of the blocks in
  use (and of the free blocks between them, which the block manager keeps few), on CPU and
  GPU alike, with no extra buffer the size of the cache.
- anything else (prefill, chunked prefill, a mixed step): queries are padded into
  [sequences, longest query] against the [sequences, longest context] keys gathered from
  the cache through each sequence's block table, for the fused SDPA kernel.

A block belongs to one sequence of a batch (no prefix sharing), which the decode path
relies on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spotserve.errors import SpotserveError


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's share of a step: `num_new` tokens ending at context length
    `context_len`, with its cache blocks."""

    num_new: int
    context_len: int
    block_table: Sequence[int]


@dataclass
class DecodeBlocks:
    """Where a decode step's blocks are. Rows are the blocks one layer's attention scores:
    the span `cache[first:stop]` read in place when the blocks in use lie densely enough,
    else the blocks in use gathered (`blocks`). A slot is a place in the padded
    [seqs, max_blocks] table: s * max_blocks + j for sequence s's j-th block."""

    span: tuple[int, int] | None
    blocks: torch.Tensor | None   # [rows] the blocks to gather when there is no span
    owner: torch.Tensor           # [rows] sequence whose query scores each row (unused: 0)
    index: torch.Tensor           # [rows] the row's place j in its owner's table (unused: 0)
    table_rows: torch.Tensor      # [seqs * max_blocks] row behind each slot (padding: 0)
    in_use: torch.Tensor          # [seqs, 1, max_blocks] fp32: 1 where a slot holds a block
    bias: torch.Tensor            # [seqs, 1, 1, max_blocks, block_size] fp32: 0, or -inf
                                  # for keys a query may not see

    @classmethod
    def build(cls, tables: list[list[int]], mask: torch.Tensor, device: torch.device | str
              ) -> DecodeBlocks:
        """For the step's block tables (each cut to its used blocks) and key `mask`
        [seqs, max_blocks * block_size]."""
        flat = [b for table in tables for b in table]
        if len(set(flat)) != len(flat):
            raise SpotserveError("a cache block appears twice in one decode step")
        num_seqs, max_blocks = len(tables), max(len(t) for t in tables)
        used = torch.tensor(flat, dtype=torch.long)
        slots = torch.tensor([s * max_blocks + j for s, table in enumerate(tables)
                              for j in range(len(table))], dtype=torch.long)
        first, stop = min(flat), max(flat) + 1
        span: tuple[int, int] | None = (first, stop)
        if stop - first <= 2 * len(flat) + 16:
            rows = used - first
        else:   # scoring that many holes would cost more than gathering
            span, rows = None, torch.arange(len(flat))
        row_slots = torch.zeros(stop - first if span else len(flat), dtype=torch.long)
        row_slots.index_copy_(0, rows, slots)
        table_rows = torch.zeros(num_seqs * max_blocks, dtype=torch.long)
        table_rows.index_copy_(0, slots, rows)
        in_use = torch.zeros(num_seqs * max_blocks)
        in_use[slots] = 1.0
        bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
        return cls(span, None if span else used.to(device),
                   (row_slots // max_blocks).to(device), (row_slots % max_blocks).to(device),
                   table_rows.to(device), in_use.view(num_seqs, 1, max_blocks).to(device),
                   bias.view(num_seqs, 1, 1, max_blocks, -1).to(device))

    def select(self, cache: torch.Tensor) -> torch.Tensor:
        """The rows' blocks of one layer's cache: a view when dense, else a gathered copy."""
        if self.span is not None:
            return cache[self.span[0]:self.span[1]]
        assert self.blocks is not None
        return cache.index_select(0, self.blocks)


@dataclass
class AttentionBatch:
    """Index tensors shared by every layer of one forward step."""

    positions: torch.Tensor      # [tokens] position of each new token
    write_blocks: torch.Tensor   # [tokens] cache block each new token's K/V goes to
    write_offsets: torch.Tensor  # [tokens] offset inside that block
    query_index: torch.Tensor    # [seqs * max_new] flat token behind each padded query
    output_index: torch.Tensor   # [tokens] padded query behind each flat token
    block_tables: torch.Tensor   # [seqs * max_blocks] each sequence's blocks, 0-padded
    mask: torch.Tensor           # [seqs, 1, max_new, max_blocks * block_size] may i see j
    num_seqs: int
    max_new: int
    decode: DecodeBlocks | None  # set when every sequence brings exactly one token

    @classmethod
    def build(cls, chunks: Sequence[SequenceChunk], block_size: int,
              device: torch.device | str = "cpu", sliding_window: int | None = None
              ) -> AttentionBatch:
        """Index tensors for a step; with `sliding_window` W, query i sees only the last W
        positions up to its own (Mistral)."""
        num_seqs = len(chunks)
        new = torch.tensor([c.num_new for c in chunks])
        context = torch.tensor([c.context_len for c in chunks])
        used = [-(-c.context_len // block_size) for c in chunks]
        max_new, max_blocks = int(new.max()), max(used)
        tables_list = [list(c.block_table[:u]) for c, u in zip(chunks, used, strict=True)]
        tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables_list],
                              dtype=torch.long)
        owner = torch.repeat_interleave(torch.arange(num_seqs), new)
        first = torch.cumsum(new, 0) - new                # flat index of each chunk's first token
        within = torch.arange(len(owner)) - first[owner]  # index of each token in its chunk
        pos = (context - new)[owner] + within
        column = torch.arange(max_new)[None, :]
        real = column < new[:, None]
        # query i sees keys 0..start+i; padded queries see key 0 only (no NaN rows)
        limits = torch.where(real, (context - new)[:, None] + column, 0)
        keys = torch.arange(max_blocks * block_size)[None, None, :]
        mask = keys <= limits[:, :, None]
        if sliding_window is not None:
            mask &= keys > limits[:, :, None] - sliding_window
        decode = None
        if max_new == 1:
            decode = DecodeBlocks.build(tables_list, mask[:, 0], device)
        return cls(positions=pos.to(device),
                   write_blocks=tables[owner, pos // block_size].to(device),
                   write_offsets=(pos % block_size).to(device),
                   query_index=torch.where(real, first[:, None] + column, 0).flatten().to(device),
                   output_index=(owner * max_new + within).to(device),
                   block_tables=tables.flatten().to(device), mask=mask[:, None].to(device),
                   num_seqs=num_seqs, max_new=max_new, decode=decode)


def write_cache(cache: torch.Tensor, batch: AttentionBatch, values: torch.Tensor) -> None:
    """Store the new tokens' `values` [tokens, kv_heads, head_dim] in one layer's cache."""
    cache[batch.write_blocks, :, batch.write_offsets] = values.to(cache.dtype)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: AttentionBatch, scale: float) -> torch.Tensor:
    """q [tokens, heads, head_dim] against the cached keys/values → [tokens, heads*head_dim].

    The new tokens' keys and values must already be written to the cache."""
    if batch.decode is not None:
        return _decode_attention(q, k_cache, v_cache, batch.decode, scale)
    return _padded_attention(q, k_cache, v_cache, batch, scale)


def _padded_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      batch: AttentionBatch, scale: float) -> torch.Tensor:
    _tokens, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    q_pad = q[batch.query_index].view(batch.num_seqs, batch.max_new, heads, dim)
    k, v = _gather(k_cache, batch), _gather(v_cache, batch)
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2), k, v, attn_mask=batch.mask, scale=scale,
        enable_gqa=heads != kv_heads)
    out = out.transpose(1, 2).reshape(batch.num_seqs * batch.max_new, heads * dim)
    return out[batch.output_index]


def _gather(cache: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
    """Each sequence's whole blocks (the mask hides their unused tail):
    [seqs, kv_heads, max_blocks * block_size, head_dim]."""
    kv_heads, block_size, dim = cache.shape[1:]
    blocks = cache.index_select(0, batch.block_tables)
    blocks = blocks.view(batch.num_seqs, -1, kv_heads, block_size, dim).transpose(1, 2)
    return blocks.reshape(batch.num_seqs, kv_heads, -1, dim)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      rows: DecodeBlocks, scale: float) -> torch.Tensor:
    """One query per sequence, scored block by block in place (see the module docstring).
    Softmax in fp32; in half precision, scores and outputs are rounded like plain matmuls."""
    seqs, heads, dim = q.shape
    _, kv_heads, block_size, _ = k_cache.shape
    group, max_blocks = heads // kv_heads, rows.bias.shape[3]
    k, v = rows.select(k_cache), rows.select(v_cache)           # [rows, kv_heads, block, dim]
    q_rows = q.view(seqs, kv_heads, group, dim).index_select(0, rows.owner)
    scores = q_rows @ k.transpose(-1, -2)                        # [rows, kv_heads, group, block]
    scores = scores.index_select(0, rows.table_rows).view(seqs, max_blocks, kv_heads, group,
                                                          block_size)
    # scaled, masked and laid out [seqs, kv_heads, group, keys] in one pass
    probs = torch.empty(seqs, kv_heads, group, max_blocks, block_size, device=q.device)
    torch.add(rows.bias, scores.permute(0, 2, 3, 1, 4), alpha=scale, out=probs)
    probs = probs.view(seqs, kv_heads, group, -1).softmax(-1).view_as(probs)
    probs = probs[rows.owner, :, :, rows.index].to(v.dtype)    # [rows, kv_heads, group, block]
    partial = (probs @ v).index_select(0, rows.table_rows)      # [slots, kv_heads, group, dim]
    partial = partial.view(seqs, max_blocks, heads * dim).float()
    # summed per sequence in fp32 and table order; padding slots (other rows) weigh 0
    return (rows.in_use @ partial).view(seqs, heads * dim).to(q.dtype)
