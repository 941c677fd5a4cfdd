"""Allocation of fixed-size KV-cache blocks to sequences. Torch-free.

Every rank of a pipeline has the same number of blocks, and the driver's block manager
hands out block ids for all of them: a block id names the same tokens on every stage and
TP rank, each holding its own layers and heads of them.

The lowest free id is always handed out first, so the blocks in use stay packed at the
start of the cache: decode attention reads them in place as one span
(`spotserve.worker.model.attention`), and the fewer free blocks inside that span, the less
it reads for nothing.
"""

from __future__ import annotations

import heapq

from spotserve.errors import SpotserveError
from spotserve.worker.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise SpotserveError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks))   # a heap: lowest id first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def missing(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` lacks to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.missing(seq, num_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Extend `seq`'s block table to cover `num_tokens` tokens."""
        need = self.missing(seq, num_tokens)
        if need > len(self._free):
            raise SpotserveError(f"out of KV blocks: {seq.request_id} needs {need}, "
                                 f"{len(self._free)} free")
        seq.block_table.extend(heapq.heappop(self._free) for _ in range(need))

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            heapq.heappush(self._free, block)
        seq.block_table = []
