"""Attention over a paged KV cache for a batch of sequences of mixed lengths.

Tokens travel flat ([tokens, ...]) through the linear layers; only attention pads them
into [sequences, longest query] against [sequences, longest context] keys gathered from
the cache through each sequence's block table. One layout serves prefill, chunked prefill
and decode alike, and a batch may mix them.

The cache of one layer is a pair of tensors [num_blocks, block_size, kv_heads, head_dim]:
heads stay a separate axis, so a slice by layer, head range and token range can be read
or written without touching the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's share of a step: `num_new` tokens ending at context length
    `context_len`, with its cache blocks."""

    num_new: int
    context_len: int
    block_table: Sequence[int]


@dataclass
class AttentionBatch:
    """Index tensors shared by every layer of one forward step."""

    positions: torch.Tensor      # [tokens] position of each new token
    slot_mapping: torch.Tensor   # [tokens] cache slot (block * block_size + offset) written
    query_index: torch.Tensor    # [seqs * max_new] flat token behind each padded query
    output_index: torch.Tensor   # [tokens] padded query behind each flat token
    block_tables: torch.Tensor   # [seqs * max_blocks] each sequence's blocks, 0-padded
    mask: torch.Tensor           # [seqs, 1, max_new, max_blocks * block_size] may i see j
    num_seqs: int
    max_new: int

    @classmethod
    def build(cls, chunks: Sequence[SequenceChunk], block_size: int,
              device: torch.device | str = "cpu", sliding_window: int | None = None
              ) -> AttentionBatch:
        """Index tensors for a step; with `sliding_window` W, query i sees only the last W
        positions up to its own (Mistral)."""
        max_new = max(c.num_new for c in chunks)
        max_blocks = max(-(-c.context_len // block_size) for c in chunks)
        positions, query_index, output_index = [], [], []
        tables = torch.zeros(len(chunks), max_blocks, dtype=torch.long)
        limits = torch.zeros(len(chunks), max_new, dtype=torch.long)
        flat = 0
        for b, c in enumerate(chunks):
            start = c.context_len - c.num_new
            used = -(-c.context_len // block_size)
            tables[b, :used] = torch.as_tensor(list(c.block_table[:used]), dtype=torch.long)
            positions.append(torch.arange(start, c.context_len))
            query_index.append(torch.cat([torch.arange(flat, flat + c.num_new),
                                          torch.zeros(max_new - c.num_new, dtype=torch.long)]))
            output_index.append(torch.arange(b * max_new, b * max_new + c.num_new))
            # query i sees keys 0..start+i; padded queries see key 0 only (no NaN rows)
            limits[b, :c.num_new] = torch.arange(start, c.context_len)
            flat += c.num_new
        pos = torch.cat(positions)
        owner = torch.repeat_interleave(torch.arange(len(chunks)),
                                        torch.tensor([c.num_new for c in chunks]))
        slots = tables[owner, pos // block_size] * block_size + pos % block_size
        keys = torch.arange(max_blocks * block_size)[None, None, :]
        mask = keys <= limits[:, :, None]
        if sliding_window is not None:
            mask &= keys > limits[:, :, None] - sliding_window
        return cls(positions=pos.to(device), slot_mapping=slots.to(device),
                   query_index=torch.cat(query_index).to(device),
                   output_index=torch.cat(output_index).to(device),
                   block_tables=tables.flatten().to(device), mask=mask[:, None].to(device),
                   num_seqs=len(chunks), max_new=max_new)


def write_cache(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """Store `values` [tokens, heads, head_dim] at `slots` of one layer's cache."""
    cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, values.to(cache.dtype))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: AttentionBatch, scale: float) -> torch.Tensor:
    """q [tokens, heads, head_dim] against the cached keys/values → [tokens, heads*head_dim].

    The new tokens' keys and values must already be written to the cache."""
    _tokens, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    q_pad = q[batch.query_index].view(batch.num_seqs, batch.max_new, heads, dim)
    # whole blocks are gathered (fast contiguous copies); the mask hides their unused tail
    k = k_cache.index_select(0, batch.block_tables).view(batch.num_seqs, -1, kv_heads, dim)
    v = v_cache.index_select(0, batch.block_tables).view(batch.num_seqs, -1, kv_heads, dim)
    if batch.max_new == 1 and q.dtype != torch.float32 and q.device.type == "cpu":
        return _decode_attention(q_pad, k, v, batch.mask, scale)
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=batch.mask,
        scale=scale, enable_gqa=heads != kv_heads)
    out = out.transpose(1, 2).reshape(batch.num_seqs * batch.max_new, heads * dim)
    return out[batch.output_index]


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """One query per sequence, by plain matmuls with an fp32 softmax: on CPU, several times
    faster than the fused kernel in bf16/fp16. q [seqs, 1, heads, dim], k/v [seqs, keys,
    kv_heads, dim] → [seqs, heads * dim]."""
    seqs, _, heads, dim = q.shape
    kv_heads = k.shape[2]
    q = q.view(seqs, kv_heads, heads // kv_heads, dim)   # query heads grouped by KV head
    scores = (q @ k.permute(0, 2, 3, 1)).float() * scale  # [seqs, kv_heads, group, keys]
    scores = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (scores.to(v.dtype) @ v.transpose(1, 2)).reshape(seqs, heads * dim)
