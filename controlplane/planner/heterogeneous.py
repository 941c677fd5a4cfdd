"""Heterogeneous search (ShuntServe): pipelines whose stages run on different GPU types.

Each stage is one whole instance (TP degree = its GPU count) holding an uneven range of
layers. For a batch B and micro-batch counts, a dynamic program over (layers covered,
stages used) extends partial pipelines one instance at a time and keeps the `top_k` best
partials per state, scored as the finished pipeline would be: throughput per $/h, times a
penalty (SLO / latency)² when the latency exceeds the SLO. The best complete pipeline is
repeated while the pool has its instances, the program reruns on what is left, and so on
until the rate is reached or nothing more fits. Requests are shared among pipelines in
proportion to their throughput. Per GPU type the largest instance type present is used.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from spotserve.catalog import InstanceType
from spotserve.layout import ParallelConfig, PipelineLayout, StageLayout
from spotserve.memory import USABLE_FRACTION
from spotserve.model_spec import ModelSpec

from .cluster import Instance
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


@dataclass(frozen=True)
class HeteroLimits:
    max_batch: int = 4
    top_k: int = 8
    max_stages: int = 8
    latency_slo_ms: float | None = None
    max_boundaries: int = 24  # layer boundaries considered: ⌈L/this⌉-layer granularity
    usable_fraction: float = USABLE_FRACTION


@dataclass(frozen=True)
class HeteroStage:
    instance_type: str
    layer_start: int
    layer_end: int


@dataclass(frozen=True)
class HeteroPipeline:
    stages: tuple[HeteroStage, ...]
    prefill_ms: float
    decode_step_ms: float
    latency_ms: float
    throughput: float
    price: float
    score: float


@dataclass(frozen=True)
class HeteroResult:
    pipelines: tuple[HeteroPipeline, ...]
    batch: int
    prefill_micro: int
    decode_micro: int
    meets_rate: bool

    @property
    def throughput(self) -> float:
        return sum(p.throughput for p in self.pipelines)

    @property
    def price(self) -> float:
        return sum(p.price for p in self.pipelines)

    @property
    def weights(self) -> tuple[float, ...]:
        """Share of requests each pipeline receives (∝ its throughput)."""
        total = self.throughput
        return tuple(p.throughput / total for p in self.pipelines) if total else ()

    def config(self, types: dict[str, InstanceType]) -> ParallelConfig:
        return ParallelConfig(tuple(
            PipelineLayout(tuple(StageLayout(s.layer_start, s.layer_end,
                                             types[s.instance_type].gpus,
                                             types[s.instance_type].gpu.name)
                                 for s in p.stages)) for p in self.pipelines), self.batch)


class _Partial(NamedTuple):
    """A pipeline under construction; `rank` is minus its score were it finished here.
    The hop out of the last stage is paid only once another stage follows it."""

    rank: float
    stages: tuple[HeteroStage, ...]
    counts: tuple[int, ...]
    s1: float
    s2: float
    hop1: float
    hop2: float
    price: float
    last_hop1: float
    last_hop2: float


_REJECTED = _Partial(0.0, (), (), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


class _Search:
    """One (B, M1, M2) dynamic program over a pool described by type counts."""

    def __init__(self, model: ModelSpec, cost: CostModel, types: Sequence[InstanceType],
                 prices: Sequence[float], workload: Workload, batch: int, m1: int, m2: int,
                 limits: HeteroLimits) -> None:
        self.model, self.cost, self.types, self.prices = model, cost, types, prices
        self.workload, self.batch, self.m1, self.m2, self.limits = (workload, batch, m1, m2,
                                                                     limits)
        step = max(1, -(-model.num_layers // limits.max_boundaries))
        self.ends = sorted({*range(step, model.num_layers, step), model.num_layers})
        self._stage_cache: dict[tuple[int, int, int], tuple[float, float, float, float] | None]
        self._stage_cache = {}

    def stage(self, t: int, start: int, end: int) -> tuple[float, float, float, float] | None:
        """(prefill ms, decode ms, prefill hop ms, decode hop ms), None if it does not fit."""
        key = (t, start, end)
        if key not in self._stage_cache:
            self._stage_cache[key] = self._cost_stage(t, start, end)
        return self._stage_cache[key]

    def _cost_stage(self, t: int, start: int, end: int) -> tuple[float, float, float,
                                                                 float] | None:
        itype, m, w = self.types[t], self.model, self.workload
        if not self.cost.supports(itype.gpu, itype.gpus) or not stage_fits(
                m, itype.gpu, itype.gpus, start, end, self.batch, w.total_tokens,
                self.limits.usable_fraction):
            return None
        hw = StageHardware(itype.gpu, itype.gpus, end - start, itype.intra_node_bytes_per_s,
                           itype.nic_bytes_per_s, last=end == m.num_layers)
        return (self.cost.stage_ms(hw, self.batch // self.m1, Phase.PREFILL, w),
                self.cost.stage_ms(hw, self.batch // self.m2, Phase.DECODE, w),
                self.cost.hop_ms(hw, self.batch, Phase.PREFILL, w),
                self.cost.hop_ms(hw, self.batch, Phase.DECODE, w))

    def _times(self, n: int, s1: float, s2: float, hop1: float, hop2: float) -> StepTimes:
        return spotserve_times(n, s1, s2, hop1, hop2, self.batch, self.m1, self.m2,
                               self.workload.output_tokens, self.cost.overhead_ms(self.batch),
                               self.cost.fix_factor)

    def _score(self, latency: float, price: float) -> float:
        throughput = self.batch / latency * 1000.0
        score = throughput / price if price > 0 else throughput
        slo = self.limits.latency_slo_ms
        if slo is not None and latency > slo:
            score *= (slo / latency) ** 2
        return score

    def finish(self, p: _Partial) -> HeteroPipeline:
        times = self._times(len(p.stages), p.s1, p.s2, p.hop1, p.hop2)
        return HeteroPipeline(p.stages, times.prefill_ms, times.decode_step_ms,
                              times.latency_ms, times.throughput, p.price,
                              self._score(times.latency_ms, p.price))

    def extend(self, p: _Partial, t: int, start: int, end: int,
               worst: float = float("inf")) -> _Partial | None:
        """`p` plus a stage of type `t` over [start, end); None if it does not fit or would
        rank no better than `worst`."""
        cost = self.stage(t, start, end)
        if cost is None:
            return None
        s1, s2 = max(p.s1, cost[0]), max(p.s2, cost[1])
        hop1, hop2 = p.hop1 + p.last_hop1, p.hop2 + p.last_hop2
        price = p.price + self.prices[t]
        latency = self._times(len(p.stages) + 1, s1, s2, hop1, hop2).latency_ms
        rank = -self._score(latency, price)
        if rank >= worst:
            return _REJECTED
        counts = tuple(c + (i == t) for i, c in enumerate(p.counts))
        return _Partial(rank, (*p.stages, HeteroStage(self.types[t].name, start, end)), counts,
                        s1, s2, hop1, hop2, price, cost[2], cost[3])

    def best(self, available: Sequence[int]) -> HeteroPipeline | None:
        """The highest-scoring complete pipeline using at most `available[t]` of type t."""
        k, L = self.limits.top_k, self.model.num_layers
        states: dict[tuple[int, int], list[_Partial]] = defaultdict(list)
        states[(0, 0)] = [_Partial(0.0, (), tuple(0 for _ in self.types), 0.0, 0.0, 0.0, 0.0,
                                   0.0, 0.0, 0.0)]
        done: list[HeteroPipeline] = []
        for stages in range(min(self.limits.max_stages, sum(available))):
            for start in [0, *self.ends[:-1]]:
                for p in states.pop((start, stages), []):
                    for t in range(len(self.types)):
                        if p.counts[t] >= available[t]:
                            continue
                        for end in (e for e in self.ends if e > start):
                            if end == L:
                                nxt = self.extend(p, t, start, end)
                                if nxt is None:
                                    break
                                done.append(self.finish(nxt))
                                continue
                            bucket = states[(end, stages + 1)]
                            worst = bucket[-1].rank if len(bucket) >= k else float("inf")
                            nxt = self.extend(p, t, start, end, worst)
                            if nxt is None:
                                break
                            if nxt is not _REJECTED:
                                _keep(bucket, nxt, k)
        return max(done, key=_pipeline_key) if done else None


def _keep(bucket: list[_Partial], cand: _Partial, k: int) -> None:
    """Insert keeping the k best (lowest rank) partials, one per (counts, s1, s2)."""
    if len(bucket) >= k and cand.rank >= bucket[-1].rank:
        return
    for i, other in enumerate(bucket):
        if (other.counts, other.s1, other.s2) == (cand.counts, cand.s1, cand.s2):
            if cand.rank < other.rank:
                bucket[i] = cand
                bucket.sort(key=_rank)
            return
    bucket.append(cand)
    bucket.sort(key=_rank)
    del bucket[k:]


def _rank(p: _Partial) -> float:
    return p.rank


def _pipeline_key(p: HeteroPipeline) -> tuple[float, float, str]:
    return (p.score, -p.latency_ms, repr(p.stages))


def pool_types(instances: Sequence[Instance]) -> tuple[list[InstanceType], list[int],
                                                       list[float]]:
    """Per GPU type, its largest instance type: the types, their counts and mean prices."""
    chosen: dict[str, InstanceType] = {}
    for inst in instances:
        cur = chosen.get(inst.type.gpu.name)
        if cur is None or inst.type.gpus > cur.gpus:
            chosen[inst.type.gpu.name] = inst.type
    types = sorted(chosen.values(), key=lambda t: t.name)
    members = [[i for i in instances if i.type.name == t.name] for t in types]
    prices = [sum(i.price for i in m) / len(m) for m in members]
    return types, [len(m) for m in members], prices


def search(model: ModelSpec, cost: CostModel, instances: Sequence[Instance],
           workload: Workload, rate: float, limits: HeteroLimits) -> HeteroResult | None:
    """Replicas of the best heterogeneous pipelines on `instances` (all usable)."""
    types, counts, prices = pool_types(instances)
    best: HeteroResult | None = None
    for b in batch_sizes(limits.max_batch):
        for m in micro_batch_counts(b):
            dp = _Search(model, cost, types, prices, workload, b, m, m, limits)
            result = _replicas(dp, counts, rate)
            if result.pipelines and (best is None or _result_key(result, rate)
                                     > _result_key(best, rate)):
                best = result
    return best


def _replicas(dp: _Search, counts: Sequence[int], rate: float) -> HeteroResult:
    left, chosen = list(counts), list[HeteroPipeline]()
    while rate <= 0 or sum(p.throughput for p in chosen) < rate:
        pipe = dp.best(left)
        if pipe is None:
            break
        use = [sum(1 for s in pipe.stages if s.instance_type == t.name) for t in dp.types]
        while all(u <= n for u, n in zip(use, left, strict=True)) and (
                rate <= 0 or sum(p.throughput for p in chosen) < rate):
            chosen.append(pipe)
            left = [n - u for u, n in zip(use, left, strict=True)]
    meets = sum(p.throughput for p in chosen) >= rate
    return HeteroResult(tuple(chosen), dp.batch, dp.m1, dp.m2, meets)


def _result_key(r: HeteroResult, rate: float) -> tuple[bool, float, float]:
    """Reaching the rate first; then cheapest (when reached) or most throughput per $/h."""
    if r.meets_rate and rate > 0:
        return (True, -r.price, r.throughput)
    return (r.meets_rate, r.throughput / r.price if r.price else r.throughput, r.throughput)
