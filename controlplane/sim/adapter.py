"""Thin glue between the simulator and the planner: the planner's outputs turned into batch
timings, and the two placements only the ablations need (a fixed-shape search, for the
ablation without the parallelization controller, and a "no device mapper" placement). No
formula lives here: every time, byte count and choice comes from a public planner
function (`pipeline_times`, `choose`, `pack_slots`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cache

from spotserve.layout import ParallelConfig, Position
from spotserve.model_spec import ModelSpec

from ..planner.cluster import GpuId, Instance, Placement
from ..planner.cost_model import CostModel, StageHardware, Workload, pipeline_times
from ..planner.device_mapper import instance_kinds, pack_slots
from ..planner.homogeneous import PipelineShape, choose

Timing = Callable[[int], tuple[float, float, float]]


def timing(cost: CostModel, stages: tuple[StageHardware, ...], prefill_micro: int,
           decode_micro: int, workload: Workload) -> Timing:
    """b requests → (prefill s, decode step s, per-batch overhead s), from `pipeline_times`
    with the micro-batch counts that divide b."""

    @cache
    def of(batch: int) -> tuple[float, float, float]:
        times = pipeline_times(cost, stages, batch, math.gcd(prefill_micro, batch),
                               math.gcd(decode_micro, batch), workload)
        overhead = times.latency_ms - times.prefill_ms \
            - workload.output_tokens * times.decode_step_ms
        return times.prefill_ms / 1000, times.decode_step_ms / 1000, max(0.0, overhead) / 1000

    return of


def naive_placement(config: ParallelConfig, hosts: Sequence[Instance]) -> Placement:
    """Positions onto instances in name order, ranks onto GPUs in index order: what a
    system without the device mapper does."""
    ordered = sorted(hosts, key=lambda h: h.name)
    slots = pack_slots(config, instance_kinds(ordered))
    free = {k: [h for h in ordered if h.type.name == k] for k in {s.kind for s in slots}}
    mapping: dict[Position, GpuId] = {}
    for slot in slots:
        host = free[slot.kind].pop(0)
        mapping.update(zip(slot.positions, host.gpus, strict=False))
    return Placement.of(config, mapping)


def fixed_shape(shapes: Sequence[PipelineShape], like: PipelineShape) -> list[PipelineShape]:
    """The shapes with the same P, M, B and micro-batches as `like`."""
    key = (like.pipeline, like.tensor, like.batch, like.prefill_micro, like.decode_micro)
    return [s for s in shapes if (s.pipeline, s.tensor, s.batch, s.prefill_micro,
                                  s.decode_micro) == key]


def config_of_shape(model: ModelSpec, shapes: Sequence[PipelineShape], hosts: Sequence[Instance],
                    rate: float) -> tuple[ParallelConfig | None, PipelineShape | None]:
    """The planner's `choose` over `shapes` on `hosts` (one instance type)."""
    if not hosts or not shapes:
        return None, None
    best, _ = choose(shapes, [h.price for h in hosts], hosts[0].type.gpus, rate, True)
    if best is None:
        return None, None
    return best.config(model), best.shape
