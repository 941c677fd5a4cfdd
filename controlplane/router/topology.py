"""The router's view of the serving pipelines, as the controller last described it.

Level-based for pipelines: each update replaces the whole set. Resume hints accumulate
(a newer hint for the same request replaces an older one) until the request uses or
finishes them, so a controller may send a hint once. An update with an older epoch than
the current one is ignored. `apply` reports which pipelines
stopped being usable for requests already running on them (gone, vanished or moved to a
new driver address), so the router can move those requests.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .dispatch import Pipeline, PipelineState
from .errors import invalid


@dataclass(frozen=True)
class ResumeHint:
    """Where an interrupted request continues, and whether its KV cache is there."""

    request_id: str
    pipeline_id: str
    mode: str  # "kv" or "reprefill"
    kv_tokens: int = 0


@dataclass
class Topology:
    epoch: int = 0
    pipelines: dict[str, Pipeline] = field(default_factory=dict)
    hints: dict[str, ResumeHint] = field(default_factory=dict)

    def apply(self, epoch: int, pipelines: Iterable[Pipeline],
              hints: Iterable[ResumeHint]) -> set[str] | None:
        """Replace the view; return the ids whose running requests must move, or None
        when the update is stale and was ignored."""
        new = {p.id: p for p in pipelines}
        if epoch < self.epoch:
            return None
        lost = {pid for pid, old in self.pipelines.items()
                if pid not in new or new[pid].state is PipelineState.GONE
                or new[pid].driver_address != old.driver_address}
        lost |= {pid for pid, p in new.items() if p.state is PipelineState.GONE}
        self.epoch = epoch
        self.pipelines = new
        self.hints.update({h.request_id: h for h in hints})
        return lost

    def serving(self) -> list[Pipeline]:
        return [p for p in self.pipelines.values() if p.state is PipelineState.SERVING]

    def usable(self, pipeline_id: str, address: str) -> bool:
        """Whether a request running on (pipeline_id, address) may keep running there."""
        pipeline = self.pipelines.get(pipeline_id)
        return (pipeline is not None and pipeline.state is not PipelineState.GONE
                and pipeline.driver_address == address)


def check_pipelines(pipelines: list[Pipeline]) -> None:
    """Validate a topology update; raise INVALID_ARGUMENT naming the field."""
    seen: set[str] = set()
    for index, pipeline in enumerate(pipelines):
        where = f"pipelines[{index}]"
        if not pipeline.id:
            raise invalid(f"{where}.id", "must not be empty")
        if pipeline.id in seen:
            raise invalid(f"{where}.id", f"duplicate pipeline id {pipeline.id!r}")
        seen.add(pipeline.id)
        if pipeline.state is not PipelineState.GONE and not pipeline.driver_address:
            raise invalid(f"{where}.driver_address", "must not be empty")
        if not pipeline.capacity >= 0.0 or pipeline.capacity == float("inf"):
            raise invalid(f"{where}.capacity", f"must be a finite number >= 0, "
                                               f"got {pipeline.capacity}")
