"""Gather the weight slices of a new role from memory, peers and the checkpoint, and build
the stage from them.

Every slice the role needs (`spotserve.layout.position_slices`) is assembled in a fresh
buffer from pieces: KEPT pieces are cut from what this worker holds (re-slicing in place
when the TP degree changes), PEER pieces are pulled over `PullTensors` straight into the
buffer when the region is contiguous, CHECKPOINT pieces are read with safetensors'
slicing. A piece whose peers all fail falls back to the checkpoint; a KEPT piece this
worker no longer holds does too. Pieces the request does not mention are KEPT when held,
else read from the checkpoint.

The engine's `build_runner(..., tensors=...)` turns the gathered slices into the stage;
`hold` then serves the stage's live parameters to peers.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from spotserve.errors import SpotserveError
from spotserve.layout import ParallelConfig, Position, TensorSlice, position_slices
from spotserve.model_spec import ModelSpec
from spotserve.v1 import common_pb2, worker_pb2
from spotserve.worker.model.decoder import TORCH_DTYPES, StageModel
from spotserve.worker.model.loader import read_slices
from spotserve.worker.tensor_store import HeldTensor, SliceError, TensorStore
from spotserve.worker.transfer import PullItem, TransferError

Puller = Callable[[list[PullItem]], Awaitable[object]]


def slice_message(piece: TensorSlice) -> common_pb2.TensorSlice:
    return common_pb2.TensorSlice(tensor=piece.tensor, dim=-1 if piece.dim is None
                                  else piece.dim, start=piece.start, stop=piece.stop)


def layout_slice(message: common_pb2.TensorSlice) -> TensorSlice:
    return TensorSlice(message.tensor, None if message.dim < 0 else message.dim,
                       message.start, message.stop)


@dataclass
class GatherStats:
    bytes_kept: int = 0
    bytes_pulled: int = 0
    bytes_from_checkpoint: int = 0
    seconds: float = 0.0
    failovers: list[str] = field(default_factory=list)
    # kept pieces left for the build to copy device to device: (the role's slice, the
    # piece of it), from the previous stage's tensors (`copy_on_device`)
    on_device: list[tuple[TensorSlice, TensorSlice]] = field(default_factory=list)


@dataclass
class _Piece:
    want: TensorSlice          # the whole slice the role needs
    piece: TensorSlice         # the part of it this piece fills
    kind: int
    peers: list[str]

    def region(self, dest: torch.Tensor) -> torch.Tensor:
        if self.want.dim is None:
            return dest
        return dest.narrow(self.want.dim, self.piece.start - self.want.start,
                           self.piece.stop - self.piece.start)


def as_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (any dtype)."""
    return tensor.view(-1).view(torch.uint8).numpy().data


def _plan(spec: ModelSpec, needed: Sequence[TensorSlice],
          sources: Sequence[worker_pb2.WeightSource]) -> list[_Piece]:
    wants = {s.tensor: s for s in needed}
    pieces: list[_Piece] = []
    for source in sources:
        piece = layout_slice(source.slice)
        want = wants.get(piece.tensor)
        if want is None:
            raise SpotserveError(f"weight source {piece.tensor!r} is not part of this role")
        if piece.dim is None:   # "the whole tensor": the role's slice of it
            piece = want
        if piece.dim != want.dim or not want.start <= piece.start < piece.stop <= want.stop:
            raise SpotserveError(f"weight source {piece.tensor} [{piece.start}, {piece.stop}) "
                                 f"along dim {piece.dim} is not inside the role's slice "
                                 f"[{want.start}, {want.stop}) along dim {want.dim}")
        pieces.append(_Piece(want, piece, source.kind, list(source.peers)))
    for want in needed:    # what the sources leave out: kept if held, else the checkpoint
        covered = sorted((p.piece.start, p.piece.stop) for p in pieces if p.want == want)
        cursor = want.start
        for start, stop in [*covered, (want.stop, want.stop)]:
            if start < cursor:
                raise SpotserveError(f"weight sources for {want.tensor} overlap")
            if start > cursor:
                gap = TensorSlice(want.tensor, want.dim, cursor, start)
                pieces.append(_Piece(want, gap, worker_pb2.SOURCE_KIND_KEPT, []))
            cursor = stop
    return pieces


def _from_store(store: TensorStore, piece: _Piece, region: torch.Tensor) -> bool:
    try:
        blob = store.select(slice_message(piece.piece))
    except SliceError:
        return False
    raw = torch.frombuffer(bytearray(blob.data), dtype=torch.uint8)
    region.copy_(raw.view(region.dtype).view(region.shape))
    return True


async def gather(spec: ModelSpec, config: ParallelConfig, position: Position,
                 sources: Sequence[worker_pb2.WeightSource], store: TensorStore,
                 checkpoint: Path | None, puller: Puller, *, skip: Collection[str] = (),
                 pin: bool = False, on_device: Mapping[str, TensorSlice] | None = None
                 ) -> tuple[dict[str, torch.Tensor], GatherStats]:
    """Assemble every slice `position` needs but those in `skip` (which the stage takes
    over on the device); the tensors by name, in pinned memory with `pin` (bound for a
    GPU), and where bytes came from. A kept piece inside a slice `on_device` names (what
    the previous stage holds on the GPU) is left for the build to copy there, device to
    device (`stats.on_device`), instead of being cut from the host copy."""
    start, stats = time.perf_counter(), GatherStats()
    dtype = TORCH_DTYPES[spec.dtype]
    needed = []
    for want in position_slices(spec, config, position):
        if want.tensor in skip:   # kept where it is, on the device
            stats.bytes_kept += math.prod(want.shape(spec.tensor(want.tensor).shape)) * \
                dtype.itemsize
        else:
            needed.append(want)
    sources = [s for s in sources if s.slice.tensor not in skip]
    dests = {s.tensor: torch.empty(s.shape(spec.tensor(s.tensor).shape), dtype=dtype,
                                   pin_memory=pin)
             for s in needed}
    from_checkpoint: list[_Piece] = []
    pulls: list[tuple[_Piece, PullItem, torch.Tensor]] = []
    for piece in _plan(spec, needed, sources):
        region = piece.region(dests[piece.want.tensor])
        if piece.kind == worker_pb2.SOURCE_KIND_KEPT and on_device is not None and \
                _inside(piece.piece, on_device.get(piece.piece.tensor)):
            stats.on_device.append((piece.want, piece.piece))
            stats.bytes_kept += region.numel() * region.element_size()
        elif piece.kind == worker_pb2.SOURCE_KIND_KEPT and _from_store(store, piece, region):
            stats.bytes_kept += region.numel() * region.element_size()
        elif piece.kind == worker_pb2.SOURCE_KIND_PEER and piece.peers:
            target = region if region.is_contiguous() else torch.empty_like(region)
            item = PullItem(as_bytes(target), list(piece.peers), weight=slice_message(piece.piece))
            pulls.append((piece, item, target))
        else:
            from_checkpoint.append(piece)
    if pulls:
        failed = await _pull(puller, [item for _, item, _ in pulls], stats)
        for piece, item, target in pulls:
            if id(item) in failed:
                from_checkpoint.append(piece)
                continue
            region = piece.region(dests[piece.want.tensor])
            if target.data_ptr() != region.data_ptr():
                region.copy_(target)
            stats.bytes_pulled += item.dest.nbytes
    if from_checkpoint:
        await asyncio.to_thread(_read_checkpoint, checkpoint, from_checkpoint, dests, dtype)
        stats.bytes_from_checkpoint += sum(_nbytes(p, dests) for p in from_checkpoint)
    stats.seconds = time.perf_counter() - start
    return dests, stats


def _inside(piece: TensorSlice, held: TensorSlice | None) -> bool:
    """Whether `held` (a slice a stage holds) contains `piece`."""
    if held is None:
        return False
    if held.dim is None:
        return True
    return piece.dim == held.dim and held.start <= piece.start and piece.stop <= held.stop


async def _pull(puller: Puller, items: list[PullItem], stats: GatherStats) -> set[int]:
    try:
        await puller(items)
    except TransferError as exc:
        stats.failovers.append(str(exc))
        return {id(item) for item in exc.failed}
    return set()


def _nbytes(piece: _Piece, dests: dict[str, torch.Tensor]) -> int:
    region = piece.region(dests[piece.want.tensor])
    return region.numel() * region.element_size()


def _read_checkpoint(folder: Path | None, pieces: list[_Piece], dests: dict[str, torch.Tensor],
                     dtype: torch.dtype) -> None:
    if folder is None:
        names = ", ".join(p.piece.tensor for p in pieces[:3])
        raise SpotserveError(f"no holder and no checkpoint for {names}")
    for piece in pieces:   # one by one: two pieces of the same tensor would collide by name
        tensor = read_slices(folder, (piece.piece,), dtype)[piece.piece.tensor]
        piece.region(dests[piece.want.tensor]).copy_(tensor)


# ---- serving the stage's weights ----------------------------------------------------------
def hold(store: TensorStore, model: StageModel) -> int:
    """Serve the model's live parameters to peers (no copy on CPU); the bytes held."""
    slices = {s.tensor: s for s in model.slices}
    total = 0
    for name in store.names():
        store.drop(name)
    for name, param in model.named_parameters():
        piece = slices.get(name)
        data = param.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        raw = np.asarray(data.contiguous().view(-1).view(torch.uint8).numpy())
        dim = -1 if piece is None or piece.dim is None else piece.dim
        offset = 0 if piece is None or piece.dim is None else piece.start
        store.put(name, HeldTensor.from_bytes(model.spec.dtype, tuple(data.shape), raw, dim,
                                              offset))
        total += raw.nbytes
    return total
