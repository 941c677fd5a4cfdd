"""The cluster as the planner sees it: instances, their GPUs, and where a configuration runs.

An `Instance` is a cloud VM of a catalog `InstanceType`, with a capacity type (spot or
on-demand), a zone and a state: `running` (serving, stays), `joining` (booted, holds
nothing yet), `doomed` (has a termination notice: can still send its data until the
deadline, is not part of the next configuration) or `lost` (gone with its data). A GPU is
named `instance/index`. A `Placement` pins every `Position` of a `ParallelConfig` to a GPU;
`PipelineProgress` says how far each running pipeline's batch has got.

`CurrentState` may also name `broken` pipelines (a member died or stopped answering: their
KV caches are gone, their surviving GPUs still hold weights) and `wiped` GPUs (their worker
was replaced: they hold nothing, though their instance lives on).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from spotserve.catalog import InstanceType
from spotserve.errors import SpotserveError
from spotserve.layout import ParallelConfig, Position

STATES = ("running", "joining", "doomed", "lost")
CAPACITY_TYPES = ("spot", "on-demand")


class GpuId(NamedTuple):
    """One GPU: `instance/index`. A tuple, so that sorting thousands of them is cheap."""

    instance: str
    index: int  # type: ignore[assignment]  # shadows tuple.index, on purpose: the GPU's index

    def __str__(self) -> str:
        return f"{self.instance}/{self.index}"

    @classmethod
    def parse(cls, text: str) -> GpuId:
        name, sep, index = str(text).rpartition("/")
        if not sep or not name or not index.isdigit():
            raise SpotserveError(f"GPU id {text!r} is not of the form INSTANCE/INDEX")
        return cls(name, int(index))


@dataclass(frozen=True)
class Instance:
    name: str
    type: InstanceType
    capacity: str = "spot"
    zone: str = ""
    state: str = "running"
    spot_price: float | None = None

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise SpotserveError(f"instance {self.name}: state must be one of "
                                 f"{', '.join(STATES)} (got {self.state!r})")
        if self.capacity not in CAPACITY_TYPES:
            raise SpotserveError(f"instance {self.name}: capacity must be spot or on-demand "
                                 f"(got {self.capacity!r})")

    @property
    def gpus(self) -> tuple[GpuId, ...]:
        return tuple(GpuId(self.name, i) for i in range(self.type.gpus))

    @property
    def usable(self) -> bool:
        """Can host a position of the next configuration."""
        return self.state in ("running", "joining")

    @property
    def price(self) -> float:
        """USD per hour: the spot price when given, else the on-demand list price."""
        if self.capacity == "spot" and self.spot_price is not None:
            return self.spot_price
        return self.type.price


@dataclass(frozen=True)
class Placement:
    """Which GPU each position of `config` runs on."""

    config: ParallelConfig
    assignment: tuple[tuple[Position, GpuId], ...]

    @classmethod
    def of(cls, config: ParallelConfig, mapping: Mapping[Position, GpuId]) -> Placement:
        missing = set(config.positions()) - set(mapping)
        if missing:
            raise SpotserveError(f"placement leaves {len(missing)} positions without a GPU, "
                                 f"e.g. {min(missing)}")
        if len(set(mapping.values())) != len(mapping):
            raise SpotserveError("placement puts two positions on one GPU")
        return cls(config, tuple(sorted(mapping.items())))

    @cached_property
    def by_position(self) -> dict[Position, GpuId]:
        return dict(self.assignment)

    @cached_property
    def by_gpu(self) -> dict[GpuId, Position]:
        return {g: p for p, g in self.assignment}

    @cached_property
    def by_pipeline(self) -> dict[int, list[tuple[Position, GpuId]]]:
        out: dict[int, list[tuple[Position, GpuId]]] = {}
        for pos, gpu in self.assignment:
            out.setdefault(pos.pipeline, []).append((pos, gpu))
        return out

    def instances(self) -> set[str]:
        return {g.instance for _, g in self.assignment}

    def pipeline_instances(self, pipeline: int) -> set[str]:
        return {g.instance for _, g in self.by_pipeline.get(pipeline, ())}


@dataclass(frozen=True)
class PipelineProgress:
    """A running pipeline's batch: KV tokens cached (all its requests together) and decode
    steps left until the whole batch finishes."""

    pipeline: int
    cached_tokens: int = 0
    remaining_steps: int = 0


@dataclass(frozen=True)
class CurrentState:
    placement: Placement
    progress: tuple[PipelineProgress, ...] = ()
    broken: frozenset[int] = frozenset()    # pipelines whose KV caches are lost
    wiped: frozenset[GpuId] = frozenset()   # GPUs that hold nothing any more

    def progress_of(self, pipeline: int) -> PipelineProgress:
        for p in self.progress:
            if p.pipeline == pipeline:
                return p
        return PipelineProgress(pipeline)
