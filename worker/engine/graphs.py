"""Decode steps replayed from CUDA graphs, at bucketed sizes (`--cuda-graphs`, off by default).

A decode step of a small batch spends most of its time launching kernels. A CUDA graph
records one step's launches once and replays them with a single launch. A graph replays
fixed shapes at fixed addresses, so each bucket (batch padded to a power of two, blocks
per sequence padded to a power of two) has its own graph and its own input buffers:

- the step's integers (token ids, positions, where each token's K/V goes, the padded block
  layout and each sequence's last position) are copied into the bucket's buffer in one
  transfer, and everything derived from them (rotary tables, masks) is computed inside the
  graph;
- attention runs over the padded layout (`DecodeLayout.padded`): each sequence's blocks
  gathered, the slots past its table pointing at a scratch block (one block beyond the
  engine's, never handed out), padding sequences writing their K/V there too;
- the last stage's graph ends with the logits; sampling runs after it, outside.

A bucket is captured on first use. Steps that are not all decodes, batches or contexts
past the largest bucket, and stages with tensor parallelism (collectives in a graph are
left for later) run eagerly. On a CPU the same fixed-shape step runs without capture:
that is how the CPU tests check its arithmetic.

Padding costs reads: a sequence's blocks are gathered up to its bucket's block count, so
a batch of very uneven contexts reads more than the eager path, which scores blocks in
place. Hence the flag, until measured on the GPUs it is meant for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spotserve.worker.engine.kv_cache import KVCache
from spotserve.worker.model.attention import (
    AttentionBatch,
    DecodeLayout,
    SequenceChunk,
    pack,
)
from spotserve.worker.model.decoder import StageModel


def bucket(n: int) -> int:
    """The power of two at or above n."""
    return 1 << max(0, n - 1).bit_length()


@dataclass
class _Graph:
    seqs: int
    max_blocks: int
    ints: torch.Tensor                 # the step's integers, as laid out by `_parts`
    names: list[str]                   # ... their parts, in order
    sizes: list[int]                   # ... and each part's length
    hidden_in: torch.Tensor | None     # a later stage's input [seqs, hidden]
    output: torch.Tensor | None = None   # hidden states, or the last stage's logits
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    """A stage's decode steps at bucketed sizes, captured (CUDA) or run as is (CPU)."""

    def __init__(self, model: StageModel, cache: KVCache, scratch: int, max_seqs: int,
                 max_blocks: int) -> None:
        if scratch >= cache.num_blocks:
            raise ValueError("the scratch block must be inside the cache")
        self.model, self.cache, self.scratch = model, cache, scratch
        self.max_seqs, self.max_blocks = bucket(max_seqs), bucket(max_blocks)
        self.capture = model.device.type == "cuda"
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.steps = 0      # fixed-shape steps run (replayed, on CUDA)

    @staticmethod
    def usable(model: StageModel) -> bool:
        return model.tp.size == 1

    def run(self, chunks: Sequence[SequenceChunk], token_ids: Sequence[int] | None,
            hidden_in: torch.Tensor | None) -> torch.Tensor | None:
        """The step's output (hidden states, or logits on the last stage), one row per
        chunk; None when this step is not one for a graph (run it eagerly)."""
        if not chunks or any(c.num_new != 1 for c in chunks):
            return None
        size = self.cache.block_size
        blocks = max(-(-c.context_len // size) for c in chunks)
        seqs, max_blocks = bucket(len(chunks)), bucket(blocks)
        if seqs > self.max_seqs or max_blocks > self.max_blocks:
            return None
        graph = self.graphs.get((seqs, max_blocks))
        if graph is None:
            graph = self._make(seqs, max_blocks)
        ints = pack(self._parts(chunks, token_ids, seqs, max_blocks), pin=self.capture)
        graph.ints.copy_(ints, non_blocking=self.capture)
        if hidden_in is not None:
            assert graph.hidden_in is not None
            graph.hidden_in[:len(chunks)].copy_(hidden_in)
        self.steps += 1
        if graph.graph is not None:
            graph.graph.replay()
        else:
            graph.output = self._forward(graph)
        assert graph.output is not None
        return graph.output[:len(chunks)]

    # ---- the fixed-shape step ---------------------------------------------------------
    def _parts(self, chunks: Sequence[SequenceChunk], token_ids: Sequence[int] | None,
               seqs: int, max_blocks: int) -> dict[str, list[int]]:
        size, pad = self.cache.block_size, seqs - len(chunks)
        positions = [c.context_len - 1 for c in chunks] + [0] * pad
        tables = [list(c.block_table[:-(-c.context_len // size)]) for c in chunks]
        layout = DecodeLayout.padded(tables, seqs, max_blocks, self.scratch)
        return {
            "positions": positions,
            "write_blocks": [c.block_table[(c.context_len - 1) // size] for c in chunks] +
            [self.scratch] * pad,
            "write_offsets": [p % size for p in positions],
            "token_ids": [*(token_ids or [0] * len(chunks)), *[0] * pad],
            **layout.parts(),
            "decode_limits": positions}

    def _make(self, seqs: int, max_blocks: int) -> _Graph:
        model = self.model
        empty = self._parts([], None, seqs, max_blocks)   # every write to the scratch block
        ints = pack(empty).to(model.device)
        hidden_in = None if model.is_first else torch.zeros(
            seqs, model.spec.hidden_size, dtype=model.dtype, device=model.device)
        graph = _Graph(seqs, max_blocks, ints, list(empty), [len(v) for v in empty.values()],
                       hidden_in)
        if not self.capture:
            self.graphs[(seqs, max_blocks)] = graph
            return graph
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):   # warm up: allocations and library handles outside the graph
                self._forward(graph)
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured, pool=self.pool):
            graph.output = self._forward(graph)
        # kept only once whole: a capture that ran out of memory leaves nothing half made
        graph.graph = captured
        self.graphs[(seqs, max_blocks)] = graph
        return graph

    def _forward(self, graph: _Graph) -> torch.Tensor:
        model, seqs = self.model, graph.seqs
        up = dict(zip(graph.names, torch.split(graph.ints, graph.sizes), strict=True))
        layout = DecodeLayout.padded([], seqs, graph.max_blocks, self.scratch)
        batch = AttentionBatch(
            positions=up["positions"], write_blocks=up["write_blocks"],
            write_offsets=up["write_offsets"],
            decode=layout.on_device(up, self.cache.block_size, model.sliding_window),
            decode_tokens=None, prefills=())
        inputs = up["token_ids"] if model.is_first else graph.hidden_in
        assert inputs is not None
        hidden = model(inputs, batch, self.cache.layers)
        return model.compute_logits(hidden) if model.is_last else hidden

