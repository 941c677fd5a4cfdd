"""Attention over a paged KV cache for a batch of sequences of mixed lengths.

The cache of one layer is a pair of tensors [num_blocks, kv_heads, block_size, head_dim]:
heads stay a separate axis, so a slice by layer, head range and token range can be read
or written without touching the rest, and within a block each head's keys are contiguous.

Tokens travel packed ([tokens, ...], each sequence's new tokens one run after another,
no padding) through the linear layers and into attention. A step's sequences split in two:

- decodes (one new token): the cache is never copied. Each block in use is scored in place
  against the query of the sequence that owns it (queries are gathered to blocks, not
  blocks to sequences: a query is `block_size` times smaller than a block). Only the scores
  and per-block outputs, which are small, move: scores to a [sequence, keys] layout for the
  softmax, probabilities back to blocks, per-block outputs summed per sequence in
  block-table order. Memory traffic is one read of the blocks in use (and of the free
  blocks between them, which the block manager keeps few), with no buffer the size of the
  cache.
- prefills (a prompt, a prompt's chunk, a re-prefill): each runs through the fused SDPA
  kernel, its queries against its own context gathered from its blocks (neighbours in the
  step with the same new and context lengths, such as a batch of equal prompts, share one
  call: still no padding); a fresh prompt is plainly causal (the flash kernel on a GPU), a
  chunk after earlier context gets a [new, context] mask built on the device. Memory is
  each sequence's own new x context, never the batch's longest query times its longest
  context.

A mixed step (prompts arriving while others decode) runs both on their own tokens. Every
index tensor a step needs is built on the host from the plan, packed into one buffer and
copied to the device once (pinned, asynchronous on CUDA); the layers share it.

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


@dataclass(frozen=True)
class DecodeLayout:
    """Where a decode step's blocks are, worked out on the host from the block tables.
    Rows are the blocks one layer's attention scores: the span `cache[first:stop]` read in
    place when the blocks in use lie densely enough, else the blocks in use gathered. A
    slot is a place in the padded [seqs, max_blocks] table: s * max_blocks + j for
    sequence s's j-th block."""

    num_seqs: int
    max_blocks: int
    span: tuple[int, int] | None
    blocks: list[int]        # the blocks to gather when there is no span (else empty)
    owner: list[int]         # [rows] sequence whose query scores each row (unused: 0)
    index: list[int]         # [rows] the row's place j in its owner's table (unused: 0)
    table_rows: list[int]    # [seqs * max_blocks] row behind each slot (padding: 0)
    in_use: list[int]        # [seqs * max_blocks] 1 where a slot holds a block

    @classmethod
    def of(cls, tables: list[list[int]]) -> DecodeLayout:
        """For the decoding sequences' block tables, each cut to its used blocks."""
        flat = [b for table in tables for b in table]
        if len(set(flat)) != len(flat):
            raise SpotserveError("a cache block appears twice in one decode step")
        max_blocks = max(len(t) for t in tables)
        slots = [s * max_blocks + j for s, table in enumerate(tables) for j in range(len(table))]
        first, stop = min(flat), max(flat) + 1
        span: tuple[int, int] | None = (first, stop)
        if stop - first <= 2 * len(flat) + 16:
            rows = [b - first for b in flat]
        else:   # scoring that many holes would cost more than gathering
            span, rows = None, list(range(len(flat)))
        row_slots = [0] * (stop - first if span else len(flat))
        table_rows = [0] * (len(tables) * max_blocks)
        in_use = [0] * (len(tables) * max_blocks)
        for row, slot in zip(rows, slots, strict=True):
            row_slots[row], table_rows[slot], in_use[slot] = slot, row, 1
        return cls(len(tables), max_blocks, span, [] if span else flat,
                   [s // max_blocks for s in row_slots], [s % max_blocks for s in row_slots],
                   table_rows, in_use)

    @classmethod
    def padded(cls, tables: list[list[int]], seqs: int, max_blocks: int, scratch: int
               ) -> DecodeLayout:
        """A fixed-shape layout (CUDA graphs): `seqs` sequences of `max_blocks` blocks,
        gathered, whatever the tables; the slots past a table, and the sequences past the
        tables, point at the `scratch` block."""
        blocks = [scratch] * (seqs * max_blocks)
        in_use = [0] * (seqs * max_blocks)
        for s, table in enumerate(tables):
            if len(table) > max_blocks:
                raise SpotserveError(f"{len(table)} blocks do not fit a {max_blocks}-block "
                                     "layout")
            for j, block in enumerate(table):
                blocks[s * max_blocks + j], in_use[s * max_blocks + j] = block, 1
        rows = list(range(seqs * max_blocks))
        return cls(seqs, max_blocks, None, blocks, [r // max_blocks for r in rows],
                   [r % max_blocks for r in rows], rows, in_use)

    def parts(self) -> dict[str, list[int]]:
        return {"decode_blocks": self.blocks, "decode_owner": self.owner,
                "decode_index": self.index, "decode_table_rows": self.table_rows,
                "decode_in_use": self.in_use}

    def on_device(self, up: dict[str, torch.Tensor], block_size: int, window: int | None
                  ) -> DecodeBlocks:
        """The device side, from the uploaded parts (and `decode_limits`: each sequence's
        last position)."""
        seqs, max_blocks = self.num_seqs, self.max_blocks
        device = up["decode_owner"].device
        in_use = up["decode_in_use"].float()
        keys = torch.arange(max_blocks * block_size, device=device)[None, :]
        limits = up["decode_limits"][:, None]
        hidden = keys > limits
        if window is not None:
            hidden |= keys <= limits - window
        bias = torch.zeros(hidden.shape, device=device).masked_fill_(hidden, float("-inf"))
        return DecodeBlocks(self.span, None if self.span else up["decode_blocks"],
                            up["decode_owner"], up["decode_index"], up["decode_table_rows"],
                            in_use.view(seqs, 1, max_blocks),
                            bias.view(seqs, 1, 1, max_blocks, block_size))


@dataclass
class DecodeBlocks:
    """A decode step's `DecodeLayout` on the device."""

    span: tuple[int, int] | None
    blocks: torch.Tensor | None   # [rows] the blocks to gather when there is no span
    owner: torch.Tensor           # [rows] sequence whose query scores each row (unused: 0)
    index: torch.Tensor           # [rows] the row's place j in its owner's table (unused: 0)
    table_rows: torch.Tensor      # [seqs * max_blocks] row behind each slot (padding: 0)
    in_use: torch.Tensor          # [seqs, 1, max_blocks] fp32: 1 where a slot holds a block
    bias: torch.Tensor            # [seqs, 1, 1, max_blocks, block_size] fp32: 0, or -inf
                                  # for keys a query may not see

    def select(self, cache: torch.Tensor) -> torch.Tensor:
        """The rows' blocks of one layer's cache: a view when dense, else a gathered copy."""
        if self.span is not None:
            return cache[self.span[0]:self.span[1]]
        assert self.blocks is not None
        return cache.index_select(0, self.blocks)


@dataclass(frozen=True)
class PrefillSeq:
    """Neighbouring sequences (one or more) that each bring `num_new` > 1 tokens ending at
    `context_len`: their queries are `tokens[start:stop]`, one sequence after another; the
    keys of each are the first `context_len` of its row of `blocks` [seqs, blocks]; `mask`
    [new, context] says which key each query sees (None: plain causal, the chunk being the
    whole context)."""

    start: int
    stop: int
    context_len: int
    blocks: torch.Tensor
    mask: torch.Tensor | None


@dataclass
class AttentionBatch:
    """Index tensors shared by every layer of one forward step."""

    positions: torch.Tensor      # [tokens] position of each new token
    write_blocks: torch.Tensor   # [tokens] cache block each new token's K/V goes to
    write_offsets: torch.Tensor  # [tokens] offset inside that block
    decode: DecodeBlocks | None  # the decoding sequences (one new token each), if any
    decode_tokens: torch.Tensor | None  # [decodes] their tokens' places (None: all tokens)
    prefills: tuple[PrefillSeq, ...]
    token_ids: torch.Tensor | None = None     # [tokens] input ids, when given to `build`
    sample_rows: torch.Tensor | None = None   # rows of the output to sample, when given

    @classmethod
    def build(cls, chunks: Sequence[SequenceChunk], block_size: int,
              device: torch.device | str = "cpu", sliding_window: int | None = None, *,
              token_ids: Sequence[int] | None = None,
              sample_rows: Sequence[int] | None = None) -> AttentionBatch:
        """Index tensors for a step, on `device` in one copy; with `sliding_window` W,
        query i sees only the last W positions up to its own (Mistral). `token_ids` and
        `sample_rows` ride along in the same copy."""
        device = torch.device(device)
        positions: list[int] = []
        write_blocks: list[int] = []
        decodes: list[int] = []
        for i, c in enumerate(chunks):
            if c.num_new < 1 or c.context_len < c.num_new:
                raise SpotserveError(f"bad step chunk: {c.num_new} new of {c.context_len}")
            first = c.context_len - c.num_new
            span = range(first, c.context_len)
            positions.extend(span)
            write_blocks.extend(c.block_table[p // block_size] for p in span)
            if c.num_new == 1:
                decodes.append(i)
        prefill_ids = [i for i, c in enumerate(chunks) if c.num_new > 1]
        starts = [0]
        for c in chunks:
            starts.append(starts[-1] + c.num_new)
        used = [list(c.block_table[:-(-c.context_len // block_size)]) for c in chunks]
        parts: dict[str, list[int]] = {
            "positions": positions, "write_blocks": write_blocks,
            "write_offsets": [p % block_size for p in positions],
            "prefill_blocks": [b for i in prefill_ids for b in used[i]],
            "token_ids": list(token_ids or ()), "sample_rows": list(sample_rows or ())}
        layout = None
        if decodes:
            layout = DecodeLayout.of([used[i] for i in decodes])
            parts.update(layout.parts())
            parts["decode_limits"] = [chunks[i].context_len - 1 for i in decodes]
            parts["decode_tokens"] = [starts[i] for i in decodes]
        up = _upload(parts, device)
        decode = None
        if layout is not None:
            decode = layout.on_device(up, block_size, sliding_window)
        prefills, offset = [], 0
        for group in _neighbours(chunks, prefill_ids):
            c, n = chunks[group[0]], len(used[group[0]])
            blocks = up["prefill_blocks"][offset:offset + n * len(group)].view(len(group), n)
            offset += n * len(group)
            prefills.append(PrefillSeq(starts[group[0]], starts[group[-1] + 1], c.context_len,
                                       blocks, _prefill_mask(c, sliding_window, device)))
        all_decode = len(decodes) == len(chunks)
        return cls(positions=up["positions"], write_blocks=up["write_blocks"],
                   write_offsets=up["write_offsets"], decode=decode,
                   decode_tokens=None if all_decode or not decodes else up["decode_tokens"],
                   prefills=tuple(prefills),
                   token_ids=up["token_ids"] if token_ids is not None else None,
                   sample_rows=up["sample_rows"] if sample_rows is not None else None)


def _neighbours(chunks: Sequence[SequenceChunk], ids: list[int]) -> list[list[int]]:
    """`ids` in runs of adjacent chunks with the same new and context lengths."""
    runs: list[list[int]] = []
    for i in ids:
        last = runs[-1][-1] if runs else None
        if last is not None and last == i - 1 and \
                (chunks[i].num_new, chunks[i].context_len) == \
                (chunks[last].num_new, chunks[last].context_len):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def pack(parts: dict[str, list[int]], pin: bool = False) -> torch.Tensor:
    """The step's integer lists end to end in one int64 host buffer (pinned with `pin`,
    for a copy to a GPU that is not waited for)."""
    flat = torch.tensor([v for values in parts.values() for v in values], dtype=torch.long)
    return flat.pin_memory() if pin else flat


def _upload(parts: dict[str, list[int]], device: torch.device) -> dict[str, torch.Tensor]:
    """The step's integer lists as int64 tensors on `device`: one host buffer, one copy
    (from pinned memory, not waited for, on CUDA)."""
    flat = pack(parts, pin=device.type == "cuda")
    if device.type == "cuda":
        flat = flat.to(device, non_blocking=True)
    elif device.type != "cpu":
        flat = flat.to(device)
    return dict(zip(parts, torch.split(flat, [len(v) for v in parts.values()]), strict=True))


def _prefill_mask(chunk: SequenceChunk, window: int | None, device: torch.device
                  ) -> torch.Tensor | None:
    """[new, context] bool on `device`: query i (position context - new + i) sees key j
    when j <= its position (and within the window). None when that is plain causal."""
    first = chunk.context_len - chunk.num_new
    if first == 0 and window is None:
        return None
    query = torch.arange(first, chunk.context_len, device=device)[:, None]
    keys = torch.arange(chunk.context_len, device=device)[None, :]
    mask = keys <= query
    if window is not None:
        mask &= keys > query - window
    return mask


def write_cache(cache: torch.Tensor, batch: AttentionBatch, values: torch.Tensor) -> None:
    """Store the new tokens' `values` [tokens, kv_heads, head_dim] in one layer's cache."""
    cache[batch.write_blocks, :, batch.write_offsets] = values.to(cache.dtype)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: AttentionBatch, scale: float) -> torch.Tensor:
    """q [tokens, heads, head_dim] against the cached keys/values → [tokens, heads*head_dim].

    The new tokens' keys and values must already be written to the cache."""
    if batch.decode is not None and batch.decode_tokens is None:   # a plain decode step
        return _decode_attention(q, k_cache, v_cache, batch.decode, scale)
    tokens, heads, dim = q.shape
    out = q.new_empty(tokens, heads * dim)
    if batch.decode is not None:
        assert batch.decode_tokens is not None
        out.index_copy_(0, batch.decode_tokens, _decode_attention(
            q.index_select(0, batch.decode_tokens), k_cache, v_cache, batch.decode, scale))
    for seq in batch.prefills:
        out[seq.start:seq.stop] = _prefill_attention(q[seq.start:seq.stop], k_cache, v_cache,
                                                     seq, scale)
    return out


def _prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       seq: PrefillSeq, scale: float) -> torch.Tensor:
    """The sequences' queries [seqs * new, heads, dim] against each one's own context →
    [seqs * new, heads * dim]."""
    tokens, heads, dim = q.shape
    seqs, kv_heads = seq.blocks.shape[0], k_cache.shape[1]
    k, v = _context(k_cache, seq), _context(v_cache, seq)
    out = F.scaled_dot_product_attention(
        q.view(seqs, -1, heads, dim).transpose(1, 2), k, v, attn_mask=seq.mask,
        is_causal=seq.mask is None, scale=scale, enable_gqa=heads != kv_heads)
    return out.transpose(1, 2).reshape(tokens, heads * dim)


def _context(cache: torch.Tensor, seq: PrefillSeq) -> torch.Tensor:
    """Each sequence's first `context_len` keys (or values) [seqs, kv_heads, context, dim]."""
    kv_heads, _block_size, dim = cache.shape[1:]
    seqs, n = seq.blocks.shape
    blocks = cache.index_select(0, seq.blocks.flatten()).view(seqs, n, kv_heads, -1, dim)
    return blocks.transpose(1, 2).reshape(seqs, kv_heads, -1, dim)[:, :, :seq.context_len]


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
