"""Device mapper: which GPU takes which position of the new configuration (Kuhn–Munkres).

The new configuration's positions are packed, in (pipeline, stage, rank) order, into
instance-sized *slots*: TP groups smaller than an instance share one, larger ones fill
whole instances, so a TP group never straddles part of an instance. Level one matches the
GPUs of an instance to the ranks of a slot; level two matches instances to slots. Both
maximise reused bytes: weights a GPU already holds (`shared_weight_bytes`) plus, when the
new pipeline inherits the old pipeline's requests, its KV cache (`shared_kv_bytes`).
`scipy.optimize.linear_sum_assignment` solves both levels; identical level-one matrices
are solved once. A pure scale-out (old pipelines kept as they are, new ones added) skips
the matching.

Inheritance: every old pipeline whose KV can still be read hands its requests, with their
KV, to one new pipeline. The ones with the most cached tokens are matched one to one (the
placement keeps their GPUs where it can); when D shrinks, each of the rest is adopted by
the new pipeline with the fewest inherited tokens so far, and its KV moves there, so that
a shrink costs no re-prefill.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment  # type: ignore[import-untyped]

from spotserve.errors import SpotserveError
from spotserve.layout import ParallelConfig, Position, shared_kv_bytes, shared_weight_bytes
from spotserve.model_spec import ModelSpec

from .cluster import CurrentState, GpuId, Instance, Placement

# (new pipeline, old pipeline) pairs: the new one resumes the old one's requests from their
# KV. Each old pipeline appears at most once; a new one may take several (a shrink).
Inheritance = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class MappingResult:
    placement: Placement
    inherits: Inheritance  # (new pipeline, old pipeline whose requests and KV it takes)
    reused_weight_bytes: int
    reused_kv_bytes: int
    fast_path: bool = False

    @property
    def reused_bytes(self) -> int:
        return self.reused_weight_bytes + self.reused_kv_bytes

    def inherited_by(self, old_pipeline: int) -> int | None:
        return next((n for n, o in self.inherits if o == old_pipeline), None)


@dataclass(frozen=True)
class Slot:
    """Positions one instance will run; `kind` is the instance type it needs."""

    kind: str
    positions: tuple[Position, ...]


def choose_inheritance(current: CurrentState | None, new: ParallelConfig,
                       readable: set[str]) -> Inheritance:
    """Which new pipeline resumes which old pipeline's requests from their KV: every old
    pipeline with cached tokens whose every GPU can still be read (not broken, nothing
    wiped). The `new.data` with the most cached tokens go one to one (an old pipeline
    keeps its index where it can, which lets an unchanged pipeline carry over); each of
    the others is adopted by the new pipeline holding the fewest inherited tokens so far."""
    if current is None:
        return ()
    old = current.placement
    tokens = {d: current.progress_of(d).cached_tokens for d in range(old.config.data)}
    alive = [d for d in range(old.config.data)
             if tokens[d] > 0 and d not in current.broken
             and old.pipeline_instances(d) <= readable
             and not {g for _, g in old.by_pipeline.get(d, ())} & current.wiped]
    alive.sort(key=lambda d: (-tokens[d], d))
    kept, rest = alive[:new.data], alive[new.data:]
    heirs = {d: d for d in kept if d < new.data}
    free = iter(n for n in range(new.data) if n not in heirs.values())
    heirs.update((d, next(free)) for d in kept if d >= new.data)
    load = dict.fromkeys(range(new.data), 0)
    for d, n in heirs.items():
        load[n] += tokens[d]
    for d in rest:
        n = min(load, key=lambda n: (load[n], n))
        heirs[d] = n
        load[n] += tokens[d]
    return tuple(sorted((n, d) for d, n in heirs.items()))


def pack_slots(config: ParallelConfig, kinds: Mapping[str | None, tuple[str, int]]) -> list[Slot]:
    """Cut the configuration into instance-sized slots. `kinds` maps a stage's gpu_type to
    (instance type, GPUs per instance) hosting it."""
    slots: list[Slot] = []
    open_slots: dict[str, list[Position]] = {}
    for d, pipe in enumerate(config.pipelines):
        for s, stage in enumerate(pipe.stages):
            kind, size = _kind_of(kinds, stage.gpu_type)
            ranks = [Position(d, s, r) for r in range(stage.tp)]
            if stage.tp >= size:
                if stage.tp % size:
                    raise SpotserveError(f"TP degree {stage.tp} does not fill whole "
                                         f"{kind} instances of {size} GPUs")
                slots += [Slot(kind, tuple(ranks[i:i + size]))
                          for i in range(0, stage.tp, size)]
                continue
            pending = open_slots.setdefault(kind, [])
            if size % stage.tp or len(pending) + stage.tp > size:
                raise SpotserveError(f"TP degree {stage.tp} does not pack into {kind} "
                                     f"instances of {size} GPUs")
            pending += ranks
            if len(pending) == size:
                slots.append(Slot(kind, tuple(pending)))
                open_slots[kind] = []
    slots += [Slot(k, tuple(p)) for k, p in open_slots.items() if p]
    return slots


def _kind_of(kinds: Mapping[str | None, tuple[str, int]], gpu_type: str | None) -> tuple[str,
                                                                                        int]:
    found = kinds.get(gpu_type) or (kinds.get(None) if gpu_type is None else None)
    if found is None:
        raise SpotserveError(f"no instance type hosts stages of GPU type {gpu_type!r}")
    return found


def instance_kinds(instances: Sequence[Instance]) -> dict[str | None, tuple[str, int]]:
    """gpu_type → (instance type, GPUs): each GPU type's largest instance type present;
    None (a homogeneous configuration) → the first instance's type."""
    kinds: dict[str | None, tuple[str, int]] = {}
    for inst in sorted(instances, key=lambda i: -i.type.gpus):
        kinds.setdefault(inst.type.gpu.name, (inst.type.name, inst.type.gpus))
    if instances:
        kinds[None] = (instances[0].type.name, instances[0].type.gpus)
    return kinds


def _shape_classes(config: ParallelConfig, positions: Sequence[Position]
                   ) -> tuple[NDArray[np.int64], list[Position]]:
    """Group positions that hold the same bytes (same stage range, ends and rank): each
    position's class index, and one representative per class."""
    index: dict[tuple[object, ...], int] = {}
    representatives: list[Position] = []
    out = np.empty(len(positions), dtype=np.int64)
    for n, pos in enumerate(positions):
        key = (config.stage_of(pos), pos.stage == 0, config.is_last_stage(pos), pos.tp_rank)
        if key not in index:
            index[key] = len(representatives)
            representatives.append(pos)
        out[n] = index[key]
    return out, representatives


def reuse_matrix(model: ModelSpec, current: CurrentState | None, new: ParallelConfig,
                 gpus: Sequence[GpuId], positions: Sequence[Position | None],
                 readable: set[str], inherits: Inheritance
                 ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(weight bytes, KV bytes) GPU `gpus[i]` already holds for `positions[j]` (None: pad)."""
    shape = (len(gpus), len(positions))
    weights, kv = np.zeros(shape), np.zeros(shape)
    if current is None:
        return weights, kv
    old = current.placement
    rows = [i for i, g in enumerate(gpus) if g in old.by_gpu and g.instance in readable
            and g not in current.wiped]
    cols = [j for j, p in enumerate(positions) if p is not None]
    if not rows or not cols:
        return weights, kv
    old_pos = [old.by_gpu[gpus[i]] for i in rows]
    new_pos = [p for p in positions if p is not None]
    ko, olds = _shape_classes(old.config, old_pos)
    kn, news = _shape_classes(new, new_pos)
    # reused bytes per pair of classes, from the layout math; KV per cached token
    w_small = np.array([[shared_weight_bytes(model, old.config, a, new, b) for b in news]
                        for a in olds], dtype=np.float64)
    kv_small = np.array([[shared_kv_bytes(model, old.config, a, new, b, 1) for b in news]
                         for a in olds], dtype=np.float64)
    r, c = np.ix_(rows, cols)
    weights[r, c] = w_small[np.ix_(ko, kn)]
    old_pipe = np.array([p.pipeline for p in old_pos])
    new_pipe = np.array([p.pipeline for p in new_pos])
    takes = np.zeros((old.config.data, new.data), dtype=bool)
    for n, o in inherits:
        takes[o, n] = True
    tokens = np.array([current.progress_of(p.pipeline).cached_tokens for p in old_pos],
                      dtype=np.float64)
    same = takes[np.ix_(old_pipe, new_pipe)]
    kv[r, c] = kv_small[np.ix_(ko, kn)] * same * tokens[:, None]
    return weights, kv


def map_devices(model: ModelSpec, new: ParallelConfig, instances: Sequence[Instance],
                current: CurrentState | None = None) -> MappingResult:
    """Place `new` on the usable `instances`, keeping as many bytes in place as possible.
    `current` (the running placement and its progress) may mention doomed instances, whose
    data still counts for KV inheritance, and lost ones, whose data is gone."""
    hosts = sorted((i for i in instances if i.usable), key=lambda i: (i.price, i.name))
    if not hosts:
        raise SpotserveError("no usable (running or joining) instances to place it on")
    readable = {i.name for i in instances if i.state != "lost"}
    inherits = choose_inheritance(current, new, readable)
    fast = _scale_out(model, new, hosts, current, instances, inherits)
    if fast is not None:
        return fast
    slots = pack_slots(new, instance_kinds(hosts))
    assignment: dict[Position, GpuId] = {}
    for kind in sorted({s.kind for s in slots}):
        kind_slots = [s for s in slots if s.kind == kind]
        kind_hosts = [h for h in hosts if h.type.name == kind]
        assignment.update(_match_kind(model, new, kind_slots, kind_hosts, current, readable,
                                      inherits))
    return _result(model, new, assignment, current, readable, inherits, fast_path=False)


def _match_kind(model: ModelSpec, new: ParallelConfig, slots: list[Slot], hosts: list[Instance],
                current: CurrentState | None, readable: set[str],
                inherits: Inheritance) -> dict[Position, GpuId]:
    if len(hosts) < len(slots):
        raise SpotserveError(f"the configuration needs {len(slots)} {slots[0].kind} "
                             f"instances but only {len(hosts)} are usable")
    size = max(h.type.gpus for h in hosts)
    gpus = [g for h in hosts for g in h.gpus]
    cols: list[Position | None] = [s.positions[k] if k < len(s.positions) else None
                                   for s in slots for k in range(size)]
    weights, kv = reuse_matrix(model, current, new, gpus, cols, readable, inherits)
    blocks = (weights + kv).reshape(len(hosts), size, len(slots), size).transpose(0, 2, 1, 3)
    value, inner = _inner_solutions(blocks)
    prices = np.array([h.price for h in hosts])
    tie_break = prices / (prices.max() * (len(hosts) + 1)) if prices.max() > 0 else prices
    rows, cols_idx = linear_sum_assignment(value - tie_break[:, None], maximize=True)
    out: dict[Position, GpuId] = {}
    for i, j in zip(rows, cols_idx, strict=True):
        for gpu_k, rank_k in enumerate(inner[i][j]):
            pos = cols[j * size + rank_k]
            if pos is not None:
                out[pos] = gpus[i * size + gpu_k]
    return out


def _inner_solutions(blocks: NDArray[np.float64]
                     ) -> tuple[NDArray[np.float64], list[list[tuple[int, ...]]]]:
    """Level one: for each (instance, slot), the best GPU → rank matching and its value."""
    n_hosts, n_slots, size, _ = blocks.shape
    value = np.zeros((n_hosts, n_slots))
    identity = tuple(range(size))
    inner = [[identity] * n_slots for _ in range(n_hosts)]
    solved: dict[bytes, tuple[float, tuple[int, ...]]] = {}
    for i, j in zip(*np.nonzero(blocks.any(axis=(2, 3))), strict=True):
        matrix = blocks[i, j]
        key = matrix.tobytes()
        if key not in solved:
            r, c = linear_sum_assignment(matrix, maximize=True)
            perm = tuple(int(x) for x in c[np.argsort(r)])
            solved[key] = (float(matrix[r, c].sum()), perm)
        value[i, j], inner[i][j] = solved[key]
    return value, inner


def _scale_out(model: ModelSpec, new: ParallelConfig, hosts: list[Instance],
               current: CurrentState | None, instances: Sequence[Instance],
               inherits: Inheritance) -> MappingResult | None:
    """Old pipelines untouched on surviving instances, new pipelines on idle instances."""
    if current is None:
        return None
    old = current.placement
    host_names = {h.name for h in hosts}
    if (new.pipelines[:old.config.data] != old.config.pipelines
            or not old.instances() <= host_names):
        return None
    idle = [h for h in hosts if h.name not in old.instances()]
    added = ParallelConfig(new.pipelines[old.config.data:], new.batch)
    if not added.pipelines:
        assignment = dict(old.by_position)
    else:
        try:
            slots = pack_slots(added, instance_kinds(idle))
        except SpotserveError:
            return None
        assignment = dict(old.by_position)
        free = {k: [h for h in idle if h.type.name == k] for k in {s.kind for s in slots}}
        for slot in slots:
            if not free[slot.kind]:
                return None
            host = free[slot.kind].pop(0)
            for pos, gpu in zip(slot.positions, host.gpus, strict=False):
                assignment[Position(pos.pipeline + old.config.data, pos.stage,
                                    pos.tp_rank)] = gpu
    readable = {i.name for i in instances if i.state != "lost"}
    return _result(model, new, assignment, current, readable, inherits, fast_path=True)


def _result(model: ModelSpec, new: ParallelConfig, assignment: dict[Position, GpuId],
            current: CurrentState | None, readable: set[str], inherits: Inheritance,
            fast_path: bool) -> MappingResult:
    placement = Placement.of(new, assignment)
    weight_total, kv_total = reused_bytes(model, placement, current, readable, inherits)
    return MappingResult(placement, inherits, weight_total, kv_total,
                         fast_path)


def reused_bytes(model: ModelSpec, placement: Placement, current: CurrentState | None,
                 readable: set[str], inherits: Inheritance) -> tuple[int, int]:
    """(weight bytes, KV bytes) already where `placement` needs them."""
    if current is None:
        return 0, 0
    gpus = [g for _, g in placement.assignment]
    positions: list[Position | None] = [p for p, _ in placement.assignment]
    weights, kv = reuse_matrix(model, current, placement.config, gpus, positions, readable,
                               inherits)
    return int(np.trace(weights)), int(np.trace(kv))
