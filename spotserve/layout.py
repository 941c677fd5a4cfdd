"""Parallel layouts and the pure math of who holds which slice of which tensor.

A `ParallelConfig` is D pipelines, each a list of stages; a stage covers a contiguous
layer range with its own tensor-parallel degree (uneven ranges and per-stage TP degrees
give heterogeneous pipelines). A `Position(pipeline, stage, tp_rank)` is one GPU's role.

Everything that needs to know what a GPU holds asks this module: the worker's loader
(`position_slices`), the device mapper (`shared_weight_bytes`, `shared_kv_bytes`), the
migration planner (`reshard_plan`, `kv_reshard_plan`) and the tests.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

from spotserve.errors import SpotserveError
from spotserve.model_spec import ModelSpec, TensorSpec


@dataclass(frozen=True, order=True)
class Position:
    """One GPU's role in a configuration."""

    pipeline: int
    stage: int
    tp_rank: int

    def __str__(self) -> str:
        return f"p{self.pipeline}s{self.stage}t{self.tp_rank}"


@dataclass(frozen=True)
class StageLayout:
    """Layers [layer_start, layer_end) run with TP degree `tp` (on `gpu_type`, if pinned)."""

    layer_start: int
    layer_end: int
    tp: int
    gpu_type: str | None = None

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    def layers(self) -> range:
        return range(self.layer_start, self.layer_end)


@dataclass(frozen=True)
class PipelineLayout:
    stages: tuple[StageLayout, ...]

    @property
    def num_gpus(self) -> int:
        return sum(s.tp for s in self.stages)


@dataclass(frozen=True)
class ParallelConfig:
    """D pipelines (data parallel replicas) serving batches of up to `batch` requests."""

    pipelines: tuple[PipelineLayout, ...]
    batch: int = 1

    @classmethod
    def uniform(cls, num_layers: int, data: int, pipeline: int, tensor: int, batch: int = 1,
                gpu_type: str | None = None) -> ParallelConfig:
        """SpotServe's homogeneous (D, P, M, B): layers split as evenly as possible."""
        if min(data, pipeline, tensor, batch) < 1:
            raise SpotserveError("D, P, M and B must all be at least 1")
        if pipeline > num_layers:
            raise SpotserveError(f"P={pipeline} exceeds the model's {num_layers} layers")
        stages = tuple(StageLayout(a, b, tensor, gpu_type)
                       for a, b in split_layers(num_layers, pipeline))
        return cls(tuple(PipelineLayout(stages) for _ in range(data)), batch)

    @property
    def data(self) -> int:
        return len(self.pipelines)

    @property
    def is_uniform(self) -> bool:
        return len(set(self.pipelines)) <= 1 and len({s.tp for s in self._all_stages()}) <= 1

    @property
    def pipeline_degree(self) -> int:
        """P: stages per pipeline (the largest, for heterogeneous configurations)."""
        return max((len(p.stages) for p in self.pipelines), default=0)

    @property
    def tensor_degree(self) -> int:
        """M: TP degree (the largest, for heterogeneous configurations)."""
        return max((s.tp for s in self._all_stages()), default=0)

    @property
    def num_gpus(self) -> int:
        return sum(p.num_gpus for p in self.pipelines)

    def _all_stages(self) -> Iterator[StageLayout]:
        for p in self.pipelines:
            yield from p.stages

    def positions(self) -> tuple[Position, ...]:
        return tuple(Position(d, s, r) for d, p in enumerate(self.pipelines)
                     for s, stage in enumerate(p.stages) for r in range(stage.tp))

    def stage_of(self, position: Position) -> StageLayout:
        try:
            return self.pipelines[position.pipeline].stages[position.stage]
        except IndexError:
            raise SpotserveError(f"position {position} is not in this configuration") from None

    def is_last_stage(self, position: Position) -> bool:
        return position.stage == len(self.pipelines[position.pipeline].stages) - 1

    def validate(self, model: ModelSpec) -> None:
        """Raise `SpotserveError` unless every pipeline covers all layers in order with
        TP degrees that keep whole heads on each rank."""
        if not self.pipelines:
            raise SpotserveError("a configuration needs at least one pipeline")
        for d, pipe in enumerate(self.pipelines):
            expected = 0
            for s, stage in enumerate(pipe.stages):
                if stage.layer_start != expected or stage.layer_end <= stage.layer_start:
                    raise SpotserveError(f"pipeline {d} stage {s}: layers "
                                         f"[{stage.layer_start}, {stage.layer_end}) do not "
                                         f"continue from layer {expected}")
                if not model.supports_tp(stage.tp):
                    raise SpotserveError(f"pipeline {d} stage {s}: TP degree {stage.tp} does "
                                         f"not divide {model.name}'s {model.num_heads} heads "
                                         f"/ {model.num_kv_heads} KV heads")
                expected = stage.layer_end
            if expected != model.num_layers:
                raise SpotserveError(f"pipeline {d} covers {expected} of "
                                     f"{model.num_layers} layers")

    def describe(self) -> str:
        if self.is_uniform and self.pipelines:
            return (f"D={self.data} P={self.pipeline_degree} M={self.tensor_degree} "
                    f"B={self.batch}")
        pipes = "; ".join("+".join(f"{s.gpu_type or 'gpu'}x{s.tp}[{s.layer_start}:{s.layer_end}]"
                                   for s in p.stages) for p in self.pipelines)
        return f"D={self.data} B={self.batch} ({pipes})"


def split_layers(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """Balanced contiguous layer ranges; earlier stages take the extra layers."""
    bounds = [0]
    for s in range(stages):
        bounds.append(bounds[-1] + num_layers // stages + (1 if s < num_layers % stages else 0))
    return list(itertools.pairwise(bounds))


# ---- which slice of a tensor a TP rank holds -----------------------------------------
def shard_units(units: int, tp: int, rank: int, *, replicate: bool = False) -> tuple[int, int]:
    """The [start, stop) units of `units` that rank `rank` of `tp` holds.

    Balanced contiguous ranges. With `replicate` (KV heads) and more ranks than units,
    each rank holds one whole unit, shared by tp/units consecutive ranks."""
    if not 0 <= rank < tp:
        raise SpotserveError(f"TP rank {rank} out of range for degree {tp}")
    if replicate and tp > units:
        unit = rank * units // tp
        return unit, unit + 1
    return rank * units // tp, (rank + 1) * units // tp


def kv_heads(model: ModelSpec, tp: int, rank: int) -> tuple[int, int]:
    """The KV heads [start, stop) rank `rank` of a TP-`tp` stage keeps (and caches)."""
    return shard_units(model.num_kv_heads, tp, rank, replicate=True)


@dataclass(frozen=True, order=True)
class TensorSlice:
    """Rows/columns [start, stop) of `tensor` along `dim`; dim None means the whole tensor."""

    tensor: str
    dim: int | None
    start: int
    stop: int

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        if self.dim is None:
            return full
        return tuple(self.stop - self.start if i == self.dim else n for i, n in enumerate(full))

    def numel(self, full: tuple[int, ...]) -> int:
        return math.prod(self.shape(full))


def tensor_slice(spec: TensorSpec, tp: int, rank: int) -> TensorSlice:
    dim = spec.split.dim
    if dim is None:
        return TensorSlice(spec.name, None, 0, spec.shape[0])
    lo, hi = shard_units(spec.units, tp, rank, replicate=spec.kv)
    return TensorSlice(spec.name, dim, lo * spec.unit, hi * spec.unit)


def stage_global_tensors(model: ModelSpec, first: bool, last: bool) -> tuple[TensorSpec, ...]:
    """Non-layer tensors a stage needs: embeddings on the first, norm and head on the last."""
    wanted: set[str] = set()
    globals_ = model.global_tensors()
    if first:
        wanted.update(t.name for t in globals_ if "embed" in t.name)
    if last:
        wanted.update(t.name for t in globals_ if "embed" not in t.name)
        wanted.add(model.lm_head_name)
    return tuple(t for t in globals_ if t.name in wanted)


def position_tensors(model: ModelSpec, config: ParallelConfig,
                     position: Position) -> Iterator[TensorSpec]:
    stage = config.stage_of(position)
    yield from stage_global_tensors(model, position.stage == 0, config.is_last_stage(position))
    for layer in stage.layers():
        yield from model.layer_tensors(layer)


def position_slices(model: ModelSpec, config: ParallelConfig,
                    position: Position) -> tuple[TensorSlice, ...]:
    """Every weight slice the GPU at `position` holds."""
    tp = config.stage_of(position).tp
    return tuple(tensor_slice(t, tp, position.tp_rank)
                 for t in position_tensors(model, config, position))


def position_weight_bytes(model: ModelSpec, config: ParallelConfig, position: Position) -> int:
    stage = config.stage_of(position)
    per_layer = _layer_bytes(model, stage.tp, position.tp_rank)
    first, last = position.stage == 0, config.is_last_stage(position)
    glob = sum(tensor_slice(t, stage.tp, position.tp_rank).numel(t.shape)
               for t in stage_global_tensors(model, first, last))
    return per_layer * stage.num_layers + glob * model.dtype_bytes


def position_kv_bytes_per_token(model: ModelSpec, config: ParallelConfig,
                                position: Position) -> int:
    """KV-cache bytes one token takes on the GPU at `position`: its stage's layers, the KV
    heads it caches. The planner's memory check uses it, and so does the worker's KV-cache
    sizing (through `spotserve.memory.kv_bytes_per_block`)."""
    stage = config.stage_of(position)
    lo, hi = kv_heads(model, stage.tp, position.tp_rank)
    return model.kv_bytes_per_token_per_head * (hi - lo) * stage.num_layers


@lru_cache(maxsize=4096)
def _layer_bytes(model: ModelSpec, tp: int, rank: int) -> int:
    return sum(tensor_slice(t, tp, rank).numel(t.shape)
               for t in model.layer_tensors(0)) * model.dtype_bytes


# ---- what two positions have in common -----------------------------------------------
def _overlap(a: tuple[int, int], b: tuple[int, int]) -> int:
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))


def slice_overlap(spec: TensorSpec, a: TensorSlice, b: TensorSlice) -> int:
    """Elements two slices of the same tensor have in common."""
    if a.dim is None:
        return b.numel(spec.shape)
    if b.dim is None:
        return a.numel(spec.shape)
    return _overlap((a.start, a.stop), (b.start, b.stop)) * (spec.numel // spec.shape[a.dim])


@lru_cache(maxsize=65536)
def _shared_layer_bytes(model: ModelSpec, tp_a: int, rank_a: int, tp_b: int, rank_b: int) -> int:
    return sum(slice_overlap(t, tensor_slice(t, tp_a, rank_a), tensor_slice(t, tp_b, rank_b))
               for t in model.layer_tensors(0)) * model.dtype_bytes


def shared_weight_bytes(model: ModelSpec, config_a: ParallelConfig, pos_a: Position,
                        config_b: ParallelConfig, pos_b: Position) -> int:
    """Weight bytes a GPU at `pos_a` of `config_a` already holds for `pos_b` of `config_b`."""
    sa, sb = config_a.stage_of(pos_a), config_b.stage_of(pos_b)
    layers = _overlap((sa.layer_start, sa.layer_end), (sb.layer_start, sb.layer_end))
    total = layers * _shared_layer_bytes(model, sa.tp, pos_a.tp_rank, sb.tp, pos_b.tp_rank)
    ga = {t.name: t for t in stage_global_tensors(model, pos_a.stage == 0,
                                                  config_a.is_last_stage(pos_a))}
    for t in stage_global_tensors(model, pos_b.stage == 0, config_b.is_last_stage(pos_b)):
        if t.name in ga:
            total += slice_overlap(t, tensor_slice(t, sa.tp, pos_a.tp_rank),
                                   tensor_slice(t, sb.tp, pos_b.tp_rank)) * model.dtype_bytes
    return total


def shared_kv_bytes(model: ModelSpec, config_a: ParallelConfig, pos_a: Position,
                    config_b: ParallelConfig, pos_b: Position, tokens: int) -> int:
    """KV-cache bytes a GPU at `pos_a` holds for `pos_b`, when `pos_b`'s pipeline takes over
    `pos_a`'s pipeline's requests (`tokens` cached tokens in all). The caller decides which
    new pipeline inherits which old one; otherwise there is nothing to share."""
    sa, sb = config_a.stage_of(pos_a), config_b.stage_of(pos_b)
    layers = _overlap((sa.layer_start, sa.layer_end), (sb.layer_start, sb.layer_end))
    heads = _overlap(kv_heads(model, sa.tp, pos_a.tp_rank), kv_heads(model, sb.tp, pos_b.tp_rank))
    return 2 * layers * heads * model.head_dim * model.dtype_bytes * tokens


# ---- reshard plans -----------------------------------------------------------------------
@dataclass(frozen=True)
class SliceMove:
    """`dst` needs `piece`; any of `sources` (old positions) holds all of it. No sources
    means it must come from the checkpoint."""

    dst: Position
    piece: TensorSlice
    sources: tuple[Position, ...]


def reshard_plan(model: ModelSpec, old: ParallelConfig | None, new: ParallelConfig,
                 available: Iterable[Position] | None = None) -> tuple[SliceMove, ...]:
    """Cut every slice each new position needs into pieces, each held whole by a set of old
    positions (restricted to `available`, e.g. the surviving ones). Every element of every
    destination slice appears in exactly one move."""
    holders = _holders_index(model, old, available)
    moves: list[SliceMove] = []
    for dst in new.positions():
        for want in position_slices(model, new, dst):
            moves.extend(SliceMove(dst, piece, src)
                         for piece, src in _cut(want, holders.get(want.tensor, [])))
    return tuple(moves)


def _holders_index(model: ModelSpec, old: ParallelConfig | None,
                   available: Iterable[Position] | None) -> dict[str, list[tuple[TensorSlice,
                                                                               Position]]]:
    index: dict[str, list[tuple[TensorSlice, Position]]] = {}
    if old is None:
        return index
    keep = set(old.positions() if available is None else available)
    for pos in old.positions():
        if pos in keep:
            for held in position_slices(model, old, pos):
                index.setdefault(held.tensor, []).append((held, pos))
    return index


def _cut(want: TensorSlice, holders: list[tuple[TensorSlice, Position]]
         ) -> list[tuple[TensorSlice, tuple[Position, ...]]]:
    """Split `want` at every holder boundary; each piece lists the positions holding it."""
    lo, hi = want.start, want.stop
    cuts = {lo, hi}
    for held, _ in holders:
        if held.dim is not None:
            cuts.update(c for c in (held.start, held.stop) if lo < c < hi)
    points = sorted(cuts)
    out = []
    for a, b in itertools.pairwise(points):
        piece = TensorSlice(want.tensor, want.dim, a, b)
        srcs = tuple(sorted({p for held, p in holders
                             if held.dim is None or (held.start <= a and b <= held.stop)}))
        out.append((piece, srcs))
    return out


@dataclass(frozen=True)
class KVMove:
    """`dst` needs KV heads [head_start, head_stop) of `layer` for the inherited requests;
    `sources` are the old positions of the inherited pipeline holding them."""

    dst: Position
    layer: int
    head_start: int
    head_stop: int
    sources: tuple[Position, ...]


def kv_reshard_plan(model: ModelSpec, old: ParallelConfig, old_pipeline: int,
                    new: ParallelConfig, new_pipeline: int,
                    available: Iterable[Position] | None = None) -> tuple[KVMove, ...]:
    """KV pieces the new pipeline's positions need from the old pipeline it inherits."""
    keep = set(old.positions() if available is None else available)
    olds = [p for p in old.positions() if p.pipeline == old_pipeline and p in keep]
    moves: list[KVMove] = []
    for dst in (p for p in new.positions() if p.pipeline == new_pipeline):
        stage = new.stage_of(dst)
        lo, hi = kv_heads(model, stage.tp, dst.tp_rank)
        for layer in stage.layers():
            holders = [(kv_heads(model, old.stage_of(p).tp, p.tp_rank), p) for p in olds
                       if layer in old.stage_of(p).layers()]
            cuts = sorted({lo, hi} | {c for (a, b), _ in holders for c in (a, b) if lo < c < hi})
            for a, b in itertools.pairwise(cuts):
                srcs = tuple(sorted(p for (ha, hb), p in holders if ha <= a and b <= hb))
                moves.append(KVMove(dst, layer, a, b, srcs))
    return tuple(moves)


def slices_by_name(model: ModelSpec) -> dict[str, TensorSpec]:
    return {t.name: t for t in model.tensors()}
