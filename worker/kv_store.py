"""KV caches of paused requests, held by a pipeline driver between a drain and a resume.

A drain exports each unfinished request from the engine (tokens + its whole KV cache,
[layers, 2, tokens, kv_heads, head_dim]); the driver keeps them here, serves slices of them
to the new owner over `PullTensors`, and resumes them itself if the router comes back to
this pipeline. A new owner assembles imported pieces here too. Entries expire after
`keep_seconds` so a request nobody resumes does not pin memory forever.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from spotserve.v1 import common_pb2
from spotserve.worker.engine.sequence import RequestState
from spotserve.worker.tensor_store import SliceError
from spotserve.worker.transfer import Blob


@dataclass
class Paused:
    """A request's KV (`kv` may be None when it never ran) and, when it was drained here,
    its tokens as the engine had them."""

    kv: torch.Tensor | None
    state: RequestState | None
    since: float

    @property
    def kv_tokens(self) -> int:
        return 0 if self.kv is None else int(self.kv.shape[2])


def kv_slice(kv: torch.Tensor, piece: common_pb2.KVSlice) -> torch.Tensor:
    """The [layers, 2, tokens, heads, head_dim] piece, checked against what `kv` holds."""
    layers, _, tokens, heads, _ = kv.shape
    for name, lo, hi, size in (("layers", piece.layer_start, piece.layer_end, layers),
                               ("KV heads", piece.head_start, piece.head_stop, heads),
                               ("tokens", piece.token_start, piece.token_stop, tokens)):
        if not 0 <= lo < hi <= size:
            raise SliceError(f"KV of request {piece.request_id!r}: {name} [{lo}, {hi}) "
                             f"outside the held [0, {size})")
    return kv[piece.layer_start:piece.layer_end, :, piece.token_start:piece.token_stop,
              piece.head_start:piece.head_stop]


class PausedRequests:
    def __init__(self, keep_seconds: float = 600.0) -> None:
        self.keep_seconds = keep_seconds
        self._items: dict[str, Paused] = {}
        self._lock = threading.Lock()

    def put_state(self, state: RequestState) -> None:
        with self._lock:
            self._items[state.request_id] = Paused(state.kv, state, time.monotonic())

    def put_kv(self, request_id: str, kv: torch.Tensor) -> None:
        with self._lock:
            self._items[request_id] = Paused(kv, None, time.monotonic())

    def get(self, request_id: str) -> Paused | None:
        self._expire()
        with self._lock:
            return self._items.get(request_id)

    def pop(self, request_id: str) -> Paused | None:
        self._expire()
        with self._lock:
            return self._items.pop(request_id, None)

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._items)

    def blob(self, piece: common_pb2.KVSlice) -> Blob:
        """A KV slice for `PullTensors`; `SliceError` when not held."""
        held = self.get(piece.request_id)
        if held is None or held.kv is None:
            raise SliceError(f"no KV cache held for request {piece.request_id!r}")
        part = kv_slice(held.kv, piece).contiguous()
        data = memoryview(part.view(-1).view(torch.uint8).numpy()).cast("B")
        dtype = str(part.dtype).removeprefix("torch.")
        return Blob(dtype, tuple(part.shape), data)

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.keep_seconds
        with self._lock:
            for rid in [r for r, p in self._items.items() if p.since < cutoff]:
                del self._items[rid]
