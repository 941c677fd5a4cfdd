"""Memory during a progressive migration: layers move front to back, one wave per layer.

A migration plan is ordered by layer (embeddings first, then layer 0, 1, …, then the
head), and a GPU drops an old layer as soon as that layer's wave is over. During wave l a
GPU therefore holds its new layers before l, both its old and new layer l (once, when it
keeps that shard), and its old layers after l. The peak over the waves exceeds the larger
of the old and new footprints by about one layer at most, except on a GPU whose old layers
start after its new ones (pipeline stages merged into a TP group: it gathers its new front
layers before the waves reach its old ones) or end after them (a TP group split into
stages: its new layers arrive while it still holds its share of the ones it hands on,
which other GPUs pull until their wave). `wave_peaks` computes the exact peak per GPU from
the same byte counts the memory check uses, so the planner can tell when a migration
would not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from spotserve.layout import ParallelConfig, Position
from spotserve.model_spec import ModelSpec

from .cluster import GpuId, Placement
from .memory import stage_bytes


@dataclass(frozen=True)
class WavePeak:
    old_bytes: int
    new_bytes: int
    peak_bytes: int

    @property
    def over_footprint(self) -> int:
        """How far the peak rises above the larger footprint (0 when it does not)."""
        return max(0, self.peak_bytes - max(self.old_bytes, self.new_bytes))


def _profile(model: ModelSpec, config: ParallelConfig, pos: Position) -> NDArray[np.int64]:
    """Bytes per wave: [embeddings, layer 0 … layer L-1, head] for one position."""
    stage = config.stage_of(pos)
    out = np.zeros(model.num_layers + 2, dtype=np.int64)
    per_layer = -(-model.weight_bytes_per_layer // stage.tp)
    out[stage.layer_start + 1:stage.layer_end + 1] = per_layer
    fixed = max(0, stage_bytes(model, stage.tp, stage.layer_start, stage.layer_end, 0, 0)
                - per_layer * stage.num_layers)
    layers = model.num_layers
    if stage.layer_start == 0 and stage.layer_end == layers and layers > 1:
        # a stage that is both first and last: its embeddings move in the first wave and
        # its head (what a last-only stage holds beyond its layers) in the last one
        head = max(0, stage_bytes(model, stage.tp, layers - 1, layers, 0, 0) - per_layer)
        out[-1] += min(head, fixed)
        out[0] += fixed - min(head, fixed)
    elif stage.layer_start == 0:
        out[0] += fixed
    else:
        out[-1] += fixed
    return out


def wave_peaks(model: ModelSpec, old: Placement | None, new: Placement) -> dict[GpuId, WavePeak]:
    """Per GPU of `new`: old and new weight footprints and the peak during the waves."""
    cache: dict[tuple[object, ...], NDArray[np.int64]] = {}

    def profile(config: ParallelConfig, pos: Position) -> NDArray[np.int64]:
        stage = config.stage_of(pos)
        key = (stage.layer_start, stage.layer_end, stage.tp)
        if key not in cache:
            cache[key] = _profile(model, config, pos)
        return cache[key]

    out: dict[GpuId, WavePeak] = {}
    empty = np.zeros(model.num_layers + 2, dtype=np.int64)
    for pos, gpu in new.assignment:
        after = profile(new.config, pos)
        before_pos = old.by_gpu.get(gpu) if old is not None else None
        before = empty if before_pos is None or old is None else profile(old.config, before_pos)
        kept = _kept_waves(model.num_layers, old, before_pos, new, pos)
        during = np.where(kept, after, before + after)
        prefix_new = np.concatenate(([0], np.cumsum(after)[:-1]))
        suffix_old = np.concatenate((np.cumsum(before[::-1])[::-1][1:], [0]))
        peak = int((prefix_new + during + suffix_old).max())
        out[gpu] = WavePeak(int(before.sum()), int(after.sum()), peak)
    return out


def _kept_waves(layers: int, old: Placement | None, before: Position | None, new: Placement,
                pos: Position) -> NDArray[np.bool_]:
    """Waves whose shard the GPU already holds (same layer, TP degree and rank)."""
    kept = np.zeros(layers + 2, dtype=bool)
    if old is None or before is None:
        return kept
    a, b = old.config.stage_of(before), new.config.stage_of(pos)
    if a.tp == b.tp and before.tp_rank == pos.tp_rank:
        lo, hi = max(a.layer_start, b.layer_start), min(a.layer_end, b.layer_end)
        kept[lo + 1:max(lo, hi) + 1] = True
        kept[0] = a.layer_start == b.layer_start == 0  # embeddings (and head, if also last)
        kept[-1] = a.layer_end == b.layer_end == layers
    return kept
