"""KV caches of paused requests, held by a pipeline driver between a drain and a resume.

A drain exports each unfinished request from the engine (tokens + its whole KV cache,
[layers, 2, tokens, kv_heads, head_dim]); the driver keeps them here, serves slices of them
to the new owner over `PullTensors`, and resumes them itself if the router comes back to
this pipeline. A new owner pulls and assembles imported pieces here too (`import_kv`).
Entries expire after `keep_seconds` so a request nobody resumes does not pin memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import torch

from spotserve.errors import SpotserveError
from spotserve.model_spec import ModelSpec
from spotserve.v1 import common_pb2, worker_pb2
from spotserve.worker.engine.sequence import RequestState
from spotserve.worker.model.decoder import TORCH_DTYPES
from spotserve.worker.tensor_store import SliceError
from spotserve.worker.transfer import Blob, PullItem, TransferError


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
        data = part.view(-1).view(torch.uint8).numpy().data
        dtype = str(part.dtype).removeprefix("torch.")
        return Blob(dtype, tuple(part.shape), data)

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.keep_seconds
        with self._lock:
            for rid in [r for r, p in self._items.items() if p.since < cutoff]:
                del self._items[rid]


async def import_kv(imports: Sequence[worker_pb2.KVImport], spec: ModelSpec,
                    puller: Callable[[list[PullItem]], Awaitable[object]],
                    paused: PausedRequests) -> tuple[int, list[str]]:
    """Pull every import's KV pieces and keep each request whose pieces all arrived and
    cover its whole cache. The bytes pulled, and why any request was left out (it will
    resume by re-prefill)."""
    dtype = TORCH_DTYPES[spec.dtype]
    layers, heads = spec.num_layers, spec.num_kv_heads
    by_request: dict[str, list[tuple[common_pb2.KVSlice, PullItem, torch.Tensor]]] = {}
    for entry in imports:
        s = entry.slice
        if not (s.layer_start < s.layer_end <= layers and s.head_start < s.head_stop <= heads
                and s.token_start < s.token_stop):
            raise SpotserveError(f"KV import of {s.request_id!r}: empty or out-of-range slice")
        piece = torch.empty(s.layer_end - s.layer_start, 2, s.token_stop - s.token_start,
                            s.head_stop - s.head_start, spec.head_dim, dtype=dtype)
        view = piece.view(-1).view(torch.uint8).numpy().data
        by_request.setdefault(s.request_id, []).append(
            (s, PullItem(view, list(entry.peers), kv=s), piece))
    failed: set[int] = set()
    problems: list[str] = []
    try:
        await puller([item for pieces in by_request.values() for _, item, _ in pieces])
    except TransferError as exc:
        failed, problems = {id(i) for i in exc.failed}, [str(exc)]
    total = 0
    for request_id, pieces in by_request.items():
        if any(id(item) in failed for _, item, _ in pieces):
            continue
        tokens = max(s.token_stop for s, _, _ in pieces)
        kv = torch.zeros(layers, 2, tokens, heads, spec.head_dim, dtype=dtype)
        for s, _, piece in pieces:
            kv[s.layer_start:s.layer_end, :, s.token_start:s.token_stop,
               s.head_start:s.head_stop] = piece
            total += piece.nbytes
        if sum(piece.numel() for _, _, piece in pieces) == kv.numel():
            paused.put_kv(request_id, kv)
        else:
            problems.append(f"KV pieces of {request_id!r} do not cover its cache")
    return total, problems
