"""The paged KV cache of one rank: its stage's layers, its KV heads, in fixed-size blocks.

Each layer holds keys and values as [num_blocks, kv_heads, block_size, head_dim]. A
request's cache is the blocks of its block table; `read` and `write` move a piece of it
by (global) layer range, head range and token range, which is what migration ships
between GPUs and what lets a request move to a different TP degree: the receiving rank
writes just the heads `spotserve.layout.kv_heads` assigns it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spotserve.errors import SpotserveError

Range = tuple[int, int]


class KVCache:
    def __init__(self, layers: range, heads: Range, head_dim: int, num_blocks: int,
                 block_size: int, dtype: torch.dtype, device: torch.device | str = "cpu"
                 ) -> None:
        self.layer_range, self.head_range = layers, heads
        self.block_size, self.num_blocks = block_size, num_blocks
        self.device = torch.device(device)
        shape = (num_blocks, heads[1] - heads[0], block_size, head_dim)
        # zeros, not empty: masked-out keys still pass through the softmax matmul
        self.layers = [(torch.zeros(shape, dtype=dtype, device=device),
                        torch.zeros(shape, dtype=dtype, device=device)) for _ in layers]

    @classmethod
    def for_stage(cls, model: object, num_blocks: int, block_size: int) -> KVCache:
        """A cache shaped for a `StageModel` (its layers and KV heads)."""
        from spotserve.worker.model.decoder import StageModel
        assert isinstance(model, StageModel)
        return cls(model.layer_range, model.kv_head_range, model.spec.head_dim, num_blocks,
                   block_size, model.dtype, model.device)

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes on this rank (keys and values of every layer), as allocated;
        `spotserve.memory.kv_bytes_per_block` is the same figure from the layout math."""
        return sum(cache[0].nbytes for pair in self.layers for cache in pair)

    def _slots(self, block_table: Sequence[int], tokens: Range
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset in block) of each token in the range."""
        positions = torch.arange(tokens[0], tokens[1])
        needed = (tokens[1] + self.block_size - 1) // self.block_size
        if tokens[1] > 0 and needed > len(block_table):
            raise SpotserveError(f"token range {tokens} exceeds the {len(block_table)} "
                                 f"blocks of the request")
        table = torch.as_tensor(list(block_table), dtype=torch.long)
        blocks, offsets = table[positions // self.block_size], positions % self.block_size
        return blocks.to(self.device), offsets.to(self.device)

    def _local(self, layers: Range, heads: Range) -> tuple[range, slice]:
        lo, hi = self.layer_range.start, self.layer_range.stop
        if not (lo <= layers[0] <= layers[1] <= hi):
            raise SpotserveError(f"layers {layers} not held here (this rank has [{lo}, {hi}))")
        h0, h1 = self.head_range
        if not (h0 <= heads[0] <= heads[1] <= h1):
            raise SpotserveError(f"KV heads {heads} not held here (this rank has [{h0}, {h1}))")
        return range(layers[0] - lo, layers[1] - lo), slice(heads[0] - h0, heads[1] - h0)

    def read(self, block_table: Sequence[int], layers: Range, heads: Range, tokens: Range
             ) -> torch.Tensor:
        """A copy of the request's cache: [layers, 2 (k, v), tokens, heads, head_dim]."""
        local, head_slice = self._local(layers, heads)
        blocks, offsets = self._slots(block_table, tokens)
        out = []
        for i in local:
            pair = [c[blocks, head_slice, offsets] for c in self.layers[i]]
            out.append(torch.stack(pair))
        if not out:
            return torch.empty(0)
        return torch.stack(out).clone()

    def write(self, block_table: Sequence[int], layers: Range, heads: Range, tokens: Range,
              data: torch.Tensor) -> None:
        """Store `data` [layers, 2, tokens, heads, head_dim] into the request's blocks."""
        local, head_slice = self._local(layers, heads)
        blocks, offsets = self._slots(block_table, tokens)
        expected = (len(local), 2, len(blocks), head_slice.stop - head_slice.start)
        if tuple(data.shape[:4]) != expected:
            raise SpotserveError(f"KV piece of shape {tuple(data.shape)} does not fit "
                                 f"{expected} + (head_dim,)")
        for i, piece in zip(local, data, strict=True):
            for cache, values in zip(self.layers[i], piece, strict=True):
                cache[blocks, head_slice, offsets] = values.to(device=cache.device,
                                                               dtype=cache.dtype)
