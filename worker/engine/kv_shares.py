"""One rank's share of paused requests' KV caches, kept between a drain and a resume.

A rank holds, per request, pieces of the cache: (layers × KV heads × tokens [0, n)) as
`[layers, 2, tokens, heads, head_dim]` tensors. A drain publishes the rank's own share
(its layers, its heads); a migration adds the pieces the plan sends it from old ranks;
a resume reads back exactly the rank's new ranges (`assemble`, from any pieces that
together cover them). The store outlives the epoch that wrote it, so a rank regrouped
into a new pipeline still has what it held, and serves it to peers. Entries expire after
`keep_seconds`. Torch only: no gRPC here.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

Range = tuple[int, int]


@dataclass
class KVPiece:
    """Layers × heads × tokens of one request's KV cache: [layers, 2, tokens, heads, dim]."""

    layers: Range
    heads: Range
    tokens: Range
    data: torch.Tensor

    def cut(self, layers: Range, heads: Range) -> KVPiece:
        """The sub-piece for the given (global) layer and head ranges."""
        (l0, _), (h0, _) = self.layers, self.heads
        data = self.data[layers[0] - l0:layers[1] - l0, :, :, heads[0] - h0:heads[1] - h0]
        return KVPiece(layers, heads, self.tokens, data.clone())


@dataclass
class _Held:
    pieces: list[KVPiece] = field(default_factory=list)
    since: float = field(default_factory=time.monotonic)


class KVShares:
    def __init__(self, keep_seconds: float = 600.0) -> None:
        self.keep_seconds = keep_seconds
        self._items: dict[str, _Held] = {}
        self._lock = threading.Lock()

    def put(self, request_id: str, piece: KVPiece) -> None:
        """Add a piece. Pieces of an older drain of the request (fewer tokens) are stale:
        they go, and a piece older than those held is not kept."""
        with self._lock:
            held = self._items.setdefault(request_id, _Held())
            newest = max((p.tokens[1] for p in held.pieces), default=0)
            if piece.tokens[1] < newest:
                return
            held.pieces = [p for p in held.pieces if p.tokens[1] >= piece.tokens[1]]
            held.pieces.append(piece)
            held.since = time.monotonic()

    def replace(self, request_id: str, pieces: list[KVPiece]) -> None:
        """What this rank holds of the request is exactly `pieces` (a fresh drain)."""
        with self._lock:
            self._items[request_id] = _Held(list(pieces))

    def drop(self, request_id: str) -> bool:
        with self._lock:
            return self._items.pop(request_id, None) is not None

    def ids(self) -> list[str]:
        self._expire()
        with self._lock:
            return sorted(self._items)

    def tokens(self, request_id: str) -> int:
        """Tokens the held pieces of the request cover, from the first (0: none held)."""
        self._expire()
        with self._lock:
            held = self._items.get(request_id)
            ends = [p.tokens[1] for p in held.pieces if p.tokens[0] == 0] if held else []
        return min(ends, default=0)

    def assemble(self, request_id: str, layers: Range, heads: Range, tokens: int
                 ) -> torch.Tensor | None:
        """The request's cache for exactly these layers and heads, tokens [0, tokens),
        put together from the held pieces; None when they do not cover it all."""
        self._expire()
        with self._lock:
            held = self._items.get(request_id)
            pieces = list(held.pieces) if held else []
        if not pieces or tokens <= 0:
            return None
        (l0, l1), (h0, h1) = layers, heads
        sample = pieces[0].data
        out = torch.empty(l1 - l0, 2, tokens, h1 - h0, sample.shape[-1], dtype=sample.dtype,
                          device=sample.device)
        covered = torch.zeros(l1 - l0, h1 - h0, dtype=torch.bool)
        for p in pieces:
            a, b = max(l0, p.layers[0]), min(l1, p.layers[1])
            c, d = max(h0, p.heads[0]), min(h1, p.heads[1])
            if a >= b or c >= d or p.tokens[0] != 0 or p.tokens[1] < tokens:
                continue
            out[a - l0:b - l0, :, :, c - h0:d - h0] = \
                p.data[a - p.layers[0]:b - p.layers[0], :, :tokens,
                       c - p.heads[0]:d - p.heads[0]]
            covered[a - l0:b - l0, c - h0:d - h0] = True
        return out if bool(covered.all()) else None

    def held(self) -> dict[str, list[KVPiece]]:
        """What this rank holds, by request (a copy of the lists)."""
        self._expire()
        with self._lock:
            return {rid: list(h.pieces) for rid, h in self._items.items()}

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.keep_seconds
        with self._lock:
            for rid in [r for r, h in self._items.items() if h.since < cutoff]:
                del self._items[rid]
