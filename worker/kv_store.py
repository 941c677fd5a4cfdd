"""The worker's side of moving KV caches: what a driver remembers of paused requests, the
KV slices this rank serves to peers, and the pieces it pulls from them.

The caches themselves live in the rank's `KVShares` (see `engine.kv_shares`): a drain
publishes each rank's share into it, peers pull slices of it (`blob`, by request, layers,
KV heads and tokens), and a new owner pulls its pieces into its own (`import_kv`), from
the old rank the migration plan names, else from the fallback holders listed after it.
A driver also keeps each paused request's tokens (`PausedRequests`), so that a resume on
the same pipeline can check the KV belongs to the tokens the router committed, and Status
can report them. Entries expire after `keep_seconds`.
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
from spotserve.worker.engine.kv_shares import KVPiece, KVShares
from spotserve.worker.engine.sequence import RequestState
from spotserve.worker.model.decoder import TORCH_DTYPES
from spotserve.worker.tensor_store import SliceError
from spotserve.worker.transfer import Blob, PullItem, TransferError


@dataclass
class Paused:
    """A request this driver drained: its tokens as the engine had them."""

    state: RequestState
    since: float


class PausedRequests:
    def __init__(self, keep_seconds: float = 600.0) -> None:
        self.keep_seconds = keep_seconds
        self._items: dict[str, Paused] = {}
        self._lock = threading.Lock()

    def put_state(self, state: RequestState) -> None:
        with self._lock:
            self._items[state.request_id] = Paused(state, time.monotonic())

    def get(self, request_id: str) -> Paused | None:
        self._expire()
        with self._lock:
            return self._items.get(request_id)

    def pop(self, request_id: str) -> Paused | None:
        self._expire()
        with self._lock:
            return self._items.pop(request_id, None)

    def ids(self) -> list[str]:
        self._expire()
        with self._lock:
            return sorted(self._items)

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.keep_seconds
        with self._lock:
            for rid in [r for r, p in self._items.items() if p.since < cutoff]:
                del self._items[rid]


def blob_of(shares: KVShares) -> Callable[[common_pb2.KVSlice], Blob]:
    """What `PullTensors` serves for a KV slice: assembled from this rank's shares;
    `SliceError` when they do not hold all of it."""
    def blob(piece: common_pb2.KVSlice) -> Blob:
        if not (piece.layer_start < piece.layer_end and piece.head_start < piece.head_stop
                and piece.token_start == 0 < piece.token_stop):
            raise SliceError(f"KV of request {piece.request_id!r}: layers [{piece.layer_start}"
                             f", {piece.layer_end}), heads [{piece.head_start}, "
                             f"{piece.head_stop}), tokens [{piece.token_start}, "
                             f"{piece.token_stop}): empty, or not from the first token")
        data = shares.assemble(piece.request_id, (piece.layer_start, piece.layer_end),
                               (piece.head_start, piece.head_stop), piece.token_stop)
        if data is None:
            raise SliceError(f"no KV cache held for request {piece.request_id!r} layers "
                             f"[{piece.layer_start}, {piece.layer_end}) heads "
                             f"[{piece.head_start}, {piece.head_stop}) tokens "
                             f"[0, {piece.token_stop})")
        part = data.contiguous()
        raw = part.view(-1).view(torch.uint8).numpy().data
        return Blob(str(part.dtype).removeprefix("torch."), tuple(part.shape), raw)
    return blob


async def import_kv(imports: Sequence[worker_pb2.KVImport], spec: ModelSpec,
                    puller: Callable[[list[PullItem]], Awaitable[object]],
                    shares: KVShares) -> tuple[int, list[str]]:
    """Pull every import's piece into this rank's shares. The bytes pulled, and what
    failed (those requests re-prefill unless another rank's copy covers them)."""
    dtype = TORCH_DTYPES[spec.dtype]
    pulls: list[tuple[common_pb2.KVSlice, PullItem, torch.Tensor]] = []
    for entry in imports:
        s = entry.slice
        if not (s.layer_start < s.layer_end <= spec.num_layers and s.token_start == 0 and
                s.head_start < s.head_stop <= spec.num_kv_heads and s.token_stop > 0):
            raise SpotserveError(f"KV import of {s.request_id!r}: empty or out-of-range slice")
        piece = torch.empty(s.layer_end - s.layer_start, 2, s.token_stop,
                            s.head_stop - s.head_start, spec.head_dim, dtype=dtype)
        view = piece.view(-1).view(torch.uint8).numpy().data
        pulls.append((s, PullItem(view, list(entry.peers), kv=s), piece))
    failed: set[int] = set()
    problems: list[str] = []
    try:
        await puller([item for _, item, _ in pulls])
    except TransferError as exc:
        failed, problems = {id(i) for i in exc.failed}, [str(exc)]
    total = 0
    for s, item, piece in pulls:
        if id(item) in failed:
            continue
        shares.put(s.request_id, KVPiece((s.layer_start, s.layer_end),
                                         (s.head_start, s.head_stop), (0, s.token_stop), piece))
        total += piece.nbytes
    return total, problems
