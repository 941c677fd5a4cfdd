"""A plan turned into what each worker must do for the next epoch (pure).

For every GPU of the new placement: its role (pipeline, stage, TP rank, layer range, TP
peers, neighbouring stages) and, for every weight slice it needs, where each piece comes
from: `kept` (already in its memory, re-sliced in place), `peer` (pull from these GPUs, in
order) or `checkpoint`. Pieces come from the migration plan's transfers; whatever of a
needed slice no transfer brings is, by construction of the plan, already on the GPU.

Pipelines whose GPUs and layout are unchanged keep their id and are not reconfigured
(SpotServe's scale-out fast path): the router keeps sending them requests throughout.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from spotserve.layout import (
    ParallelConfig,
    PipelineLayout,
    Position,
    StageLayout,
    TensorSlice,
    position_slices,
)
from spotserve.model_spec import ModelSpec

from ..planner.cluster import CurrentState, GpuId, Instance, PipelineProgress, Placement
from ..planner.device_mapper import Inheritance
from ..planner.migration import MigrationPlan, Transfer, migration_plan

KEPT, PEER, CHECKPOINT = "kept", "peer", "checkpoint"


@dataclass(frozen=True)
class SlicePiece:
    piece: TensorSlice
    kind: str  # kept | peer | checkpoint
    peers: tuple[GpuId, ...] = ()


@dataclass(frozen=True)
class KVPiece:
    """KV heads [head_start, head_stop) of `layer` for the requests of old pipeline
    `old_pipeline`, pulled from `src`."""

    old_pipeline: int
    layer: int
    head_start: int
    head_stop: int
    src: GpuId


@dataclass(frozen=True)
class WorkerAssignment:
    gpu: GpuId
    position: Position
    pipeline_id: str
    stage: StageLayout
    num_stages: int
    tp_peers: tuple[GpuId, ...]
    prev_stage: GpuId | None
    next_stage: GpuId | None
    pieces: tuple[SlicePiece, ...]
    kv: tuple[KVPiece, ...]
    unchanged: bool
    # The old pipelines whose drained requests this GPU's pipeline resumes, each with its
    # driver (the fallback source: it holds a whole copy of a request's KV when a rank
    # that was leaving gathered its share there at the drain).
    kv_holders: tuple[tuple[int, GpuId | None], ...] = ()

    @property
    def is_driver(self) -> bool:
        return self.position.stage == 0 and self.position.tp_rank == 0


def _pipeline_gpus(placement: Placement, pipeline: int) -> tuple[tuple[Position, GpuId], ...]:
    return tuple((p, g) for p, g in placement.assignment if p.pipeline == pipeline)


def _signature(placement: Placement, pipeline: int) -> tuple[PipelineLayout, tuple[object, ...]]:
    layout = placement.config.pipelines[pipeline]
    gpus = tuple((p.stage, p.tp_rank, g) for p, g in _pipeline_gpus(placement, pipeline))
    return layout, gpus


def unchanged_pipelines(old: Placement | None, new: Placement,
                        disturbed: Collection[int] = ()) -> dict[int, int]:
    """New pipeline → old pipeline with the same layout on the same GPUs; a `disturbed`
    old pipeline (broken, or drained already) never counts as unchanged: it regroups."""
    if old is None:
        return {}
    old_sigs = {_signature(old, d): d for d in range(old.config.data) if d not in disturbed}
    out = {}
    for d in range(new.config.data):
        match = old_sigs.get(_signature(new, d))
        if match is not None:
            out[d] = match
    return out


def pipeline_ids(epoch: int, old_ids: Sequence[str], old: Placement | None,
                 new: Placement, disturbed: Collection[int] = ()) -> list[str]:
    """Stable ids: an unchanged pipeline keeps its old id; others get `e{epoch}p{d}`."""
    same = unchanged_pipelines(old, new, disturbed)
    return [old_ids[same[d]] if d in same and same[d] < len(old_ids) else f"e{epoch}p{d}"
            for d in range(new.config.data)]


def _subtract(want: TensorSlice, covered: list[tuple[int, int]]) -> list[TensorSlice]:
    """The parts of `want` along its dim that no interval in `covered` reaches."""
    if want.dim is None:
        return [] if covered else [want]
    out, cursor = [], want.start
    for a, b in sorted(covered):
        if a > cursor:
            out.append(TensorSlice(want.tensor, want.dim, cursor, min(a, want.stop)))
        cursor = max(cursor, b)
    if cursor < want.stop:
        out.append(TensorSlice(want.tensor, want.dim, cursor, want.stop))
    return out


def _pieces(model: ModelSpec, config: ParallelConfig, position: Position,
            transfers: Sequence[Transfer]) -> tuple[SlicePiece, ...]:
    by_tensor: dict[str, list[Transfer]] = defaultdict(list)
    for t in transfers:
        by_tensor[t.tensor].append(t)
    out: list[SlicePiece] = []
    for want in position_slices(model, config, position):
        moves = by_tensor.get(want.tensor, [])
        for t in moves:
            piece = TensorSlice(t.tensor, t.dim, t.start, t.stop)
            out.append(SlicePiece(piece, CHECKPOINT if t.src is None else PEER,
                                  () if t.src is None else (t.src,)))
        out.extend(SlicePiece(rest, KEPT)
                   for rest in _subtract(want, [(t.start, t.stop) for t in moves]))
    return tuple(out)


def _drivers(gpu_at: Mapping[Position, GpuId], pipeline: int, num_stages: int
             ) -> dict[int, GpuId | None]:
    """Stage index → the GPU of its TP rank 0 (None before the first and after the last)."""
    out: dict[int, GpuId | None] = {-1: None, num_stages: None}
    out.update({s: gpu_at[Position(pipeline, s, 0)] for s in range(num_stages)})
    return out


def assignments(model: ModelSpec, epoch: int, new: Placement, transfers: Sequence[Transfer],
                old: Placement | None = None, old_ids: Sequence[str] = (),
                inherits: Inheritance = (),
                disturbed: Collection[int] = ()) -> dict[GpuId, WorkerAssignment]:
    """What every GPU of `new` does in `epoch`; `inherits` pairs a new pipeline with an
    old one whose interrupted requests it resumes; `disturbed` old pipelines regroup."""
    config = new.config
    holders: dict[int, list[tuple[int, GpuId | None]]] = defaultdict(list)
    for n, o in inherits:
        holders[n].append((o, _old_driver(old, o)))
    ids = pipeline_ids(epoch, old_ids, old, new, disturbed)
    same = unchanged_pipelines(old, new, disturbed)
    weights: dict[GpuId, list[Transfer]] = defaultdict(list)
    kv: dict[GpuId, list[KVPiece]] = defaultdict(list)
    for t in transfers:
        if t.kind == "weight":
            weights[t.dst].append(t)
        elif t.src is not None and t.kv_pipeline is not None:
            kv[t.dst].append(KVPiece(t.kv_pipeline, t.layer, t.start, t.stop, t.src))
    gpu_at = new.by_position
    out = {}
    for position, gpu in new.assignment:
        stages = config.pipelines[position.pipeline].stages
        stage = stages[position.stage]
        driver = _drivers(gpu_at, position.pipeline, len(stages))
        out[gpu] = WorkerAssignment(
            gpu=gpu, position=position, pipeline_id=ids[position.pipeline], stage=stage,
            num_stages=len(stages),
            tp_peers=tuple(gpu_at[Position(position.pipeline, position.stage, r)]
                           for r in range(stage.tp)),
            prev_stage=driver[position.stage - 1], next_stage=driver[position.stage + 1],
            pieces=_pieces(model, config, position, weights.get(gpu, [])),
            kv=tuple(kv.get(gpu, [])), unchanged=position.pipeline in same,
            kv_holders=tuple(holders.get(position.pipeline, ())))
    return out


def _old_driver(old: Placement | None, pipeline: int) -> GpuId | None:
    if old is None or pipeline >= old.config.data:
        return None
    return old.by_position.get(Position(pipeline, 0, 0))


def pipelines_to_drain(old: Placement | None, new: Placement,
                       doomed: Mapping[str, object], disturbed: Collection[int] = ()
                       ) -> list[int]:
    """Old pipelines that stop: any on a doomed instance or not carried over unchanged."""
    if old is None:
        return []
    kept = set(unchanged_pipelines(old, new, disturbed).values())
    return [d for d in range(old.config.data)
            if d not in kept or old.pipeline_instances(d) & set(doomed)]


def epoch_jobs(model: ModelSpec, epoch: int, new: Placement, old: Placement | None,
               instances: Sequence[Instance], inherits: Inheritance = (),
               cached_tokens: Mapping[int, int] | None = None, old_ids: Sequence[str] = ()
               ) -> dict[GpuId, WorkerAssignment]:
    """The jobs of a move chosen by hand (the placements given rather than planned), built
    the way the controller builds a planned one: the migration plan's transfers from `old`
    to `new` (weights, and the KV caches of old pipelines `inherits` hands to new ones,
    `cached_tokens` long), then `assignments`. For tests and benchmarks that drive workers
    without a controller."""
    plan = hand_plan(model, new, old, instances, inherits, cached_tokens)
    return assignments(model, epoch, new, plan.transfers, old, old_ids, inherits)


def hand_plan(model: ModelSpec, new: Placement, old: Placement | None,
              instances: Sequence[Instance], inherits: Inheritance = (),
              cached_tokens: Mapping[int, int] | None = None) -> MigrationPlan:
    """The migration plan (transfers, bytes, estimated seconds) of a move chosen by hand,
    as `epoch_jobs` carries it out."""
    current = None if old is None else CurrentState(old, tuple(
        PipelineProgress(d, tokens) for d, tokens in (cached_tokens or {}).items()))
    return migration_plan(model, current, new, inherits, instances)
