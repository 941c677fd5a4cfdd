"""Homogeneous search (SpotServe): the best (D, P, M, B, M1, M2) on instances of one type.

Every pipeline shape (P stages of M-way TP, batch B, M1 prefill and M2 decode micro-batches)
that fits in memory is costed once with `pipeline_times`; shapes do not depend on how many
instances there are, so the same list answers "what with N instances" for any N. A TP
group either shares one instance with other groups (M divides the instance's GPU count) or
occupies whole instances (M a multiple of it, when `tp_across_instances`); it never
straddles a partial instance. The choice is SpotServe's: the lowest latency among shapes
whose D replicas reach the rate α (ties to fewer instances, then lower cost); if none does,
the highest throughput, together with how many more instances would reach α.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from spotserve.catalog import InstanceType
from spotserve.layout import ParallelConfig, split_layers
from spotserve.memory import USABLE_FRACTION
from spotserve.model_spec import ModelSpec

from .cost_model import (
    CostModel,
    Phase,
    StageHardware,
    StepTimes,
    Workload,
    batch_sizes,
    micro_batch_counts,
    spotserve_times,
)
from .memory import stage_fits

MAX_EXTRA_INSTANCES = 256


@dataclass(frozen=True)
class SearchLimits:
    """Constraints on the search. `pipeline_divides`: P must divide it (SpotServe passes the
    profile's padded layer count). `fill`: give every instance a replica (SpotServe) rather
    than stopping at the fewest that reach the rate."""

    max_batch: int = 4
    min_gpus_per_replica: int = 1
    max_tp: int | None = None
    pipeline_divides: int | None = None
    tp_across_instances: bool = True
    fill: bool = True
    usable_fraction: float = USABLE_FRACTION


@dataclass(frozen=True)
class PipelineShape:
    """One pipeline's shape and its times (throughput of a single replica)."""

    pipeline: int
    tensor: int
    batch: int
    prefill_micro: int
    decode_micro: int
    times: StepTimes

    def replicas_on(self, instances: int, gpus_per_instance: int) -> int:
        if self.tensor <= gpus_per_instance:
            return instances * (gpus_per_instance // self.tensor) // self.pipeline
        return instances // (self.tensor // gpus_per_instance) // self.pipeline

    def instances_for(self, replicas: int, gpus_per_instance: int) -> int:
        if self.tensor <= gpus_per_instance:
            per_instance = gpus_per_instance // self.tensor
            return math.ceil(replicas * self.pipeline / per_instance)
        return replicas * self.pipeline * (self.tensor // gpus_per_instance)


@dataclass(frozen=True)
class Candidate:
    """A full homogeneous configuration: D replicas of a shape on `instances` instances."""

    data: int
    shape: PipelineShape
    instances: int
    cost_per_hour: float

    @property
    def throughput(self) -> float:
        return self.data * self.shape.times.throughput

    @property
    def latency_ms(self) -> float:
        return self.shape.times.latency_ms

    def config(self, model: ModelSpec, gpu_type: str | None = None) -> ParallelConfig:
        s = self.shape
        return ParallelConfig.uniform(model.num_layers, self.data, s.pipeline, s.tensor,
                                      s.batch, gpu_type)

    def describe(self) -> str:
        s = self.shape
        return (f"D={self.data} P={s.pipeline} M={s.tensor} B={s.batch} "
                f"M1={s.prefill_micro} M2={s.decode_micro}")


@dataclass(frozen=True)
class HomogeneousResult:
    best: Candidate | None
    meets_rate: bool
    extra_instances: int  # more instances of the same type that would reach the rate
    shapes_considered: int


def tp_degrees(model: ModelSpec, cost: CostModel, itype: InstanceType,
               limits: SearchLimits) -> list[int]:
    g = itype.gpus
    degrees = [m for m in range(1, g + 1) if g % m == 0]
    if limits.tp_across_instances:
        degrees += [g << k for k in range(1, model.num_heads.bit_length())
                    if g << k <= model.num_heads]
    cap = limits.max_tp or max(degrees)
    return [m for m in degrees if m <= cap and model.supports_tp(m)
            and cost.supports(itype.gpu, m)]


def stage_groups(model: ModelSpec, itype: InstanceType, pipeline: int,
                 tensor: int) -> list[tuple[StageHardware, int]]:
    """The same as (stage, count) runs: the longer stages, the shorter ones, the last."""
    tp_link = itype.intra_node_bytes_per_s if tensor <= itype.gpus else itype.nic_bytes_per_s
    size, longer = divmod(model.num_layers, pipeline)

    def hw(layers: int, last: bool = False) -> StageHardware:
        return StageHardware(itype.gpu, tensor, layers, tp_link, itype.nic_bytes_per_s, last)

    runs = [(hw(size + 1), longer), (hw(size), pipeline - longer - 1)]
    last_size = size + 1 if longer == pipeline else size
    if longer == pipeline:
        runs = [(hw(size + 1), longer - 1)]
    return [(s, n) for s, n in runs if n > 0] + [(hw(last_size, last=True), 1)]


def pipeline_shapes(model: ModelSpec, cost: CostModel, itype: InstanceType,
                    workload: Workload, limits: SearchLimits) -> list[PipelineShape]:
    """Every shape that fits in memory, in SpotServe's enumeration order (M, B, M1, M2, P)."""
    shapes = []
    batches = batch_sizes(limits.max_batch)
    for m in tp_degrees(model, cost, itype, limits):
        pipelines = [p for p in range(max(1, -(-limits.min_gpus_per_replica // m)),
                                      model.num_layers + 1)
                     if not limits.pipeline_divides or limits.pipeline_divides % p == 0]
        tables = {p: _StageTable(cost, stage_groups(model, itype, p, m), workload)
                  for p in pipelines}
        for b in batches:
            fitting = [p for p in pipelines if _fits(model, itype, p, m, b, workload, limits)]
            overhead = cost.overhead_ms(b)
            for m1 in micro_batch_counts(b):
                for m2 in micro_batch_counts(b):
                    shapes += [PipelineShape(p, m, b, m1, m2, tables[p].times(
                        b, m1, m2, workload.output_tokens, overhead, cost.fix_factor))
                        for p in fitting]
    return shapes


class _StageTable:
    """A uniform pipeline's slowest-stage and hop times, memoised per micro-batch size."""

    def __init__(self, cost: CostModel, groups: list[tuple[StageHardware, int]],
                 workload: Workload) -> None:
        self.cost, self.groups, self.workload = cost, groups, workload
        self.stages = sum(n for _, n in groups)
        self._slowest: dict[tuple[int, bool], float] = {}
        self._hops: dict[tuple[int, bool], float] = {}

    def slowest(self, micro_batch: int, phase: Phase) -> float:
        key = (micro_batch, phase is Phase.PREFILL)
        if key not in self._slowest:
            self._slowest[key] = max(self.cost.stage_ms(s, micro_batch, phase, self.workload)
                                     for s, _ in self.groups)
        return self._slowest[key]

    def hops(self, batch: int, phase: Phase) -> float:
        key = (batch, phase is Phase.PREFILL)
        if key not in self._hops:
            hop = [self.cost.hop_ms(s, batch, phase, self.workload) for s, _ in self.groups]
            self._hops[key] = sum(h * n for h, (_, n) in zip(hop, self.groups, strict=True)) \
                - hop[-1]
        return self._hops[key]

    def times(self, batch: int, m1: int, m2: int, output_tokens: int, overhead: float,
              fix_factor: float) -> StepTimes:
        return spotserve_times(self.stages, self.slowest(batch // m1, Phase.PREFILL),
                               self.slowest(batch // m2, Phase.DECODE),
                               self.hops(batch, Phase.PREFILL), self.hops(batch, Phase.DECODE),
                               batch, m1, m2, output_tokens, overhead, fix_factor)


def _fits(model: ModelSpec, itype: InstanceType, pipeline: int, tensor: int, batch: int,
          workload: Workload, limits: SearchLimits) -> bool:
    # split_layers front-loads layers, so the first stage is the largest but for the head
    bounds = split_layers(model.num_layers, pipeline)
    bounds = [bounds[0], bounds[-1]]
    return all(stage_fits(model, itype.gpu, tensor, a, b, batch, workload.total_tokens,
                          limits.usable_fraction) for a, b in bounds)


def choose(shapes: Sequence[PipelineShape], prices: Sequence[float], gpus_per_instance: int,
           rate: float, fill: bool) -> tuple[Candidate | None, bool]:
    """The best candidate on instances priced `prices` (cheapest used first), and whether
    it reaches `rate`."""
    n, cheapest = len(prices), sorted(prices)
    best, best_key, fallback, fallback_key = None, None, None, None
    for order, shape in enumerate(shapes):
        d_max = shape.replicas_on(n, gpus_per_instance)
        if d_max < 1:
            continue
        needed = math.ceil(rate * shape.times.latency_ms / 1000.0 / shape.batch - 1e-9)
        d = d_max if fill else min(d_max, max(1, needed))
        used = shape.instances_for(d, gpus_per_instance)
        cand = Candidate(d, shape, used, sum(cheapest[:used]))
        if cand.throughput >= rate:
            key = (cand.latency_ms, used, cand.cost_per_hour, order)
            if best_key is None or key < best_key:
                best, best_key = cand, key
        full = Candidate(d_max, shape, shape.instances_for(d_max, gpus_per_instance), 0.0)
        fkey = (-full.throughput, full.latency_ms, full.instances, order)
        if fallback_key is None or fkey < fallback_key:
            fallback = Candidate(full.data, shape, full.instances,
                                 sum(cheapest[:full.instances]))
            fallback_key = fkey
    if best is not None:
        return best, True
    return fallback, False


def extra_instances_needed(shapes: Sequence[PipelineShape], instances: int,
                           gpus_per_instance: int, rate: float) -> int:
    """The fewest more instances with which some shape reaches `rate` (0: unreachable)."""
    extra = MAX_EXTRA_INSTANCES + 1
    for s in shapes:
        replicas = math.ceil(rate / s.times.throughput - 1e-12)
        extra = min(extra, s.instances_for(max(1, replicas), gpus_per_instance) - instances)
    return max(1, extra) if extra <= MAX_EXTRA_INSTANCES else 0


def search(model: ModelSpec, cost: CostModel, itype: InstanceType, prices: Sequence[float],
           workload: Workload, rate: float, limits: SearchLimits) -> HomogeneousResult:
    """SpotServe's configuration search over `len(prices)` instances of type `itype`."""
    shapes = pipeline_shapes(model, cost, itype, workload, limits)
    best, meets = choose(shapes, prices, itype.gpus, rate, limits.fill)
    extra = 0 if meets else extra_instances_needed(shapes, len(prices), itype.gpus, rate)
    return HomogeneousResult(best, meets, extra, len(shapes))
