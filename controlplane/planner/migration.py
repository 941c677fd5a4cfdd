"""Migration plan: the transfers that turn the old placement into the new one, and how long.

What each new GPU lacks comes from the layout math (`reshard_plan`, `kv_reshard_plan`),
run once per distinct pipeline layout and expanded to every pipeline of that layout, so
planning stays fast on hundreds of GPUs. Sources are chosen so that data held only by
doomed instances is sent first (it is `urgent`: it vanishes at the deadline), a holder on
the destination's own instance is used when there is one, and otherwise the least-loaded
surviving holder sends. Transfers are ordered urgent first, then front layers before back
ones, so a GPU can drop an old layer as soon as the new layers before it have arrived.
The time estimate is the busiest instance's inbound or outbound bytes over its NIC (bytes
inside an instance over its intra-node link) plus a fixed overhead for regrouping.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

from spotserve.layout import (
    ParallelConfig,
    PipelineLayout,
    Position,
    TensorSlice,
    kv_reshard_plan,
    reshard_plan,
)
from spotserve.model_spec import ModelSpec

from .cluster import CurrentState, GpuId, Instance, Placement
from .layer_order import wave_peaks

FIXED_OVERHEAD_S = 2.0
CHECKPOINT = "checkpoint"
_SOURCE_WINDOW = 8


class Transfer(NamedTuple):
    """Copy `nbytes` of one weight slice (`tensor` rows/cols [start, stop) along `dim`) or
    one layer's KV heads [start, stop) of old pipeline `kv_pipeline` from `src` (None: the
    checkpoint store) to `dst`."""

    dst: GpuId
    src: GpuId | None
    tensor: str
    dim: int | None
    start: int
    stop: int
    layer: int
    nbytes: int
    urgent: bool = False
    kv_pipeline: int | None = None

    @property
    def kind(self) -> str:
        return "weight" if self.kv_pipeline is None else "kv"


@dataclass(frozen=True)
class MigrationPlan:
    transfers: tuple[Transfer, ...]
    seconds: float
    inbound_bytes: Mapping[str, int]
    outbound_bytes: Mapping[str, int]
    checkpoint_bytes: int
    peak_gpu_bytes: int = 0  # largest weight footprint of any GPU during the layer waves
    peak_over_footprint_bytes: int = 0  # how far any GPU rises above max(old, new) footprint

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.transfers)

    @property
    def urgent_bytes(self) -> int:
        return sum(t.nbytes for t in self.transfers if t.urgent)


def _layer_key(model: ModelSpec, tensor: str) -> int:
    """Transfer order of a tensor: its layer; embeddings before layer 0, head after the last."""
    parts = tensor.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return -1 if "embed" in tensor else model.num_layers


def _classes(config: ParallelConfig) -> tuple[ParallelConfig, list[int]]:
    """One representative pipeline per distinct layout, and each pipeline's class."""
    layouts: list[PipelineLayout] = []
    klass = []
    for pipe in config.pipelines:
        if pipe not in layouts:
            layouts.append(pipe)
        klass.append(layouts.index(pipe))
    return ParallelConfig(tuple(layouts), config.batch), klass


class _Holders:
    """The GPUs holding one piece, indexed for the picker."""

    def __init__(self, gpus: Sequence[GpuId], doomed: set[str]) -> None:
        self.gpus = frozenset(gpus)
        self.by_instance: dict[str, GpuId] = {}
        for g in sorted(gpus, reverse=True):
            self.by_instance[g.instance] = g
        safe = sorted(g for g in gpus if g.instance not in doomed)
        self.pool = safe or sorted(gpus)
        self.urgent = not safe


class _SourcePicker:
    """Chooses a holder per piece: own instance, else least-loaded survivor, else doomed."""

    def __init__(self, doomed: set[str]) -> None:
        self.doomed = doomed
        self.load: dict[str, int] = defaultdict(int)
        self.turn: dict[tuple[object, ...], int] = defaultdict(int)
        self._holders: dict[tuple[object, ...], _Holders] = {}

    def holders(self, key: tuple[object, ...],
                gpus: Callable[[], Sequence[GpuId]]) -> _Holders:
        """The GPUs `gpus()` lists, indexed once per `key` (a key always means the same
        GPUs)."""
        found = self._holders.get(key)
        if found is None:
            found = self._holders[key] = _Holders(gpus(), self.doomed)
        return found

    def pick(self, key: tuple[object, ...], holders: _Holders, dst: GpuId,
             nbytes: int) -> tuple[GpuId, bool]:
        local = holders.by_instance.get(dst.instance)
        if local is not None:
            return local, local.instance in self.doomed
        pool = holders.pool
        start = self.turn[key] % len(pool)
        self.turn[key] += 1
        window = [pool[(start + k) % len(pool)] for k in range(min(_SOURCE_WINDOW, len(pool)))]
        best = min(window, key=lambda h: self.load[h.instance])
        self.load[best.instance] += nbytes
        return best, holders.urgent


def _in_place(current: CurrentState, new: Placement, pipeline: int,
              old_pipeline: int | None = None) -> bool:
    """Every GPU of the new pipeline already runs exactly its position (in `old_pipeline`,
    when given: what matters for its KV cache; any pipeline of the same layout will do for
    weights) and still holds it (not wiped)."""
    old = current.placement
    old_by_gpu = old.by_gpu
    for pos, gpu in new.by_pipeline.get(pipeline, ()):
        if gpu in current.wiped:
            return False
        before = old_by_gpu.get(gpu)
        if (before is None or before.stage != pos.stage or before.tp_rank != pos.tp_rank
                or old.config.pipelines[before.pipeline] != new.config.pipelines[pipeline]
                or old_pipeline not in (None, before.pipeline)):
            return False
    return True


def weight_transfers(model: ModelSpec, current: CurrentState | None, new: Placement,
                     readable: set[str], picker: _SourcePicker) -> list[Transfer]:
    rep_new, new_class = _classes(new.config)
    old_rep: ParallelConfig | None = None
    old_class: list[int] = []
    holders: dict[tuple[int, int, int], list[GpuId]] = {}
    if current is not None:
        old = current.placement
        old_rep, old_class = _classes(old.config)
        holders = _holder_index(old, old_class, readable, current.wiped)
    moves = reshard_plan(model, old_rep, rep_new)
    by_class: dict[int, list[_Piece]] = defaultdict(list)
    for mv in moves:
        spec = model.tensor(mv.piece.tensor)
        by_class[mv.dst.pipeline].append(_Piece(
            mv.dst, mv.piece, mv.sources, mv.piece.numel(spec.shape) * model.dtype_bytes,
            _layer_key(model, mv.piece.tensor)))
    out: list[Transfer] = []
    for d, klass in enumerate(new_class):
        if current is not None and _in_place(current, new, d):
            continue
        gpu_of = {(p.stage, p.tp_rank): g for p, g in new.by_pipeline[d]}
        if not holders:  # nothing to reuse: every piece comes from the checkpoint
            out.extend(Transfer(gpu_of[(pc.dst.stage, pc.dst.tp_rank)], None, pc.slice.tensor,
                                pc.slice.dim, pc.slice.start, pc.slice.stop, pc.layer,
                                pc.nbytes) for pc in by_class[klass])
            continue
        for piece in by_class[klass]:
            dst = gpu_of[(piece.dst.stage, piece.dst.tp_rank)]
            out.extend(_piece_transfer(dst, piece, holders, picker))
    return out


def _holder_index(old: Placement, old_class: list[int], readable: set[str],
                  wiped: frozenset[GpuId]) -> dict[tuple[int, int, int], list[GpuId]]:
    index: dict[tuple[int, int, int], list[GpuId]] = defaultdict(list)
    for pos, gpu in old.assignment:
        if gpu.instance in readable and gpu not in wiped:
            index[(old_class[pos.pipeline], pos.stage, pos.tp_rank)].append(gpu)
    return index


class _Piece(NamedTuple):
    """A piece a representative position needs, with its size and transfer order."""

    dst: Position
    slice: TensorSlice
    sources: tuple[Position, ...]
    nbytes: int
    layer: int


def _piece_transfer(dst: GpuId, piece: _Piece,
                    holders: Mapping[tuple[int, int, int], list[GpuId]],
                    picker: _SourcePicker) -> list[Transfer]:
    held = picker.holders(("w", piece.sources), lambda: [
        g for s in piece.sources for g in holders.get((s.pipeline, s.stage, s.tp_rank), ())])
    if dst in held.gpus:
        return []
    cut = piece.slice
    if not held.gpus:
        return [Transfer(dst, None, cut.tensor, cut.dim, cut.start, cut.stop, piece.layer,
                         piece.nbytes)]
    src, urgent = picker.pick((cut.tensor, cut.start, piece.sources), held, dst, piece.nbytes)
    return [Transfer(dst, src, cut.tensor, cut.dim, cut.start, cut.stop, piece.layer,
                     piece.nbytes, urgent)]


def kv_transfers(model: ModelSpec, current: CurrentState, new: Placement,
                 inherits: Sequence[tuple[int, int]], readable: set[str],
                 picker: _SourcePicker) -> list[Transfer]:
    old = current.placement
    out: list[Transfer] = []
    for new_pipe, old_pipe in inherits:
        tokens = current.progress_of(old_pipe).cached_tokens
        if tokens <= 0 or old_pipe in current.broken or \
                _in_place(current, new, new_pipe, old_pipe):
            continue
        old_one = ParallelConfig((old.config.pipelines[old_pipe],), old.config.batch)
        new_one = ParallelConfig((new.config.pipelines[new_pipe],), new.config.batch)
        for mv in kv_reshard_plan(model, old_one, 0, new_one, 0):
            dst = new.by_position[Position(new_pipe, mv.dst.stage, mv.dst.tp_rank)]
            gpus = [old.by_position[Position(old_pipe, s.stage, s.tp_rank)] for s in mv.sources]
            gpus = [g for g in gpus if g.instance in readable]
            if not gpus or dst in gpus:
                continue
            nbytes = 2 * (mv.head_stop - mv.head_start) * model.head_dim * model.dtype_bytes \
                * tokens
            key = ("kv", old_pipe, mv.layer, mv.head_start, mv.head_stop)
            src, urgent = picker.pick(key, picker.holders(key, partial(list, gpus)), dst,
                                      nbytes)
            out.append(Transfer(dst, src, "kv", 2, mv.head_start, mv.head_stop, mv.layer,
                                nbytes, urgent, old_pipe))
    return out


def order_transfers(weights: list[Transfer], kv: list[Transfer]) -> list[Transfer]:
    """Urgent first; then layer by layer, front to back, weights before KV within a layer;
    then by destination and slice. Sorted in stable passes, as this runs on ~10⁶ transfers
    for a cold start of a large cluster."""
    weights.sort(key=_by_slice)
    kv.sort(key=_by_slice)
    merged = weights + kv
    merged.sort(key=_by_layer)  # stable: weights stay ahead of KV within a layer
    return [t for t in merged if t.urgent] + [t for t in merged if not t.urgent]


def _by_slice(t: Transfer) -> tuple[GpuId, str, int]:
    return t.dst, t.tensor, t.start


def _by_layer(t: Transfer) -> int:
    return t.layer


def estimate_seconds(transfers: Sequence[Transfer], instances: Mapping[str, Instance],
                     overhead_s: float = FIXED_OVERHEAD_S,
                     local_disk_bytes_per_s: float | None = None
                     ) -> tuple[float, dict[str, int], dict[str, int]]:
    """Busiest instance's NIC time (and intra-node and disk time) plus `overhead_s`.

    Checkpoint reads come from remote storage through the reader's NIC, unless
    `local_disk_bytes_per_s` is given: then every instance reads its share from its own
    disk at that rate, all instances at once (the SpotServe artifact's setup)."""
    inbound: dict[str, int] = defaultdict(int)
    outbound: dict[str, int] = defaultdict(int)
    local: dict[str, int] = defaultdict(int)
    disk: dict[str, int] = defaultdict(int)
    for t in transfers:
        if t.src is None and local_disk_bytes_per_s:
            disk[t.dst.instance] += t.nbytes
            continue
        if t.src is not None and t.src.instance == t.dst.instance:
            local[t.dst.instance] += t.nbytes
            continue
        inbound[t.dst.instance] += t.nbytes
        outbound[CHECKPOINT if t.src is None else t.src.instance] += t.nbytes
    seconds = 0.0
    for name, inst in instances.items():
        nic = inst.type.nic_bytes_per_s
        seconds = max(seconds, inbound.get(name, 0) / nic, outbound.get(name, 0) / nic,
                      local.get(name, 0) / inst.type.intra_node_bytes_per_s)
        if local_disk_bytes_per_s:
            seconds = max(seconds, disk.get(name, 0) / local_disk_bytes_per_s)
    if not transfers:
        return 0.0, dict(inbound), dict(outbound)
    return seconds + overhead_s, dict(inbound), dict(outbound)


def migration_plan(model: ModelSpec, current: CurrentState | None, new: Placement,
                   inherits: Sequence[tuple[int, int]], instances: Sequence[Instance],
                   overhead_s: float = FIXED_OVERHEAD_S,
                   local_disk_bytes_per_s: float | None = None) -> MigrationPlan:
    """Transfers from `current` (None: a cold start, all from the checkpoint) to `new`;
    checkpoint reads from each instance's local disk when `local_disk_bytes_per_s` is
    given (else from remote storage over the NIC)."""
    index = {i.name: i for i in instances}
    readable = {i.name for i in instances if i.state != "lost"}
    picker = _SourcePicker({i.name for i in instances if i.state == "doomed"})
    transfers = order_transfers(weight_transfers(model, current, new, readable, picker),
                                [] if current is None else
                                kv_transfers(model, current, new, inherits, readable, picker))
    seconds, inbound, outbound = estimate_seconds(transfers, index, overhead_s,
                                                  local_disk_bytes_per_s)
    checkpoint = sum(t.nbytes for t in transfers if t.src is None)
    peaks = wave_peaks(model, current.placement if current else None, new).values()
    return MigrationPlan(tuple(transfers), seconds, inbound, outbound, checkpoint,
                         max((p.peak_bytes for p in peaks), default=0),
                         max((p.over_footprint for p in peaks), default=0))
