"""Dispatch policy: which pipeline takes the next request.

Capacity-weighted least load: among serving pipelines below their concurrency cap (and not
cooling down after a failure), pick the one whose load after taking the request,
`(running + 1) / capacity`, is smallest. Pure; the scheduler holds the counts.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum


class PipelineState(Enum):
    SERVING = "serving"
    DRAINING = "draining"  # no new requests; its requests resume per the controller's hints
    GONE = "gone"          # its requests resume elsewhere by re-prefill


@dataclass(frozen=True)
class Pipeline:
    id: str
    driver_address: str
    capacity: float = 1.0
    state: PipelineState = PipelineState.SERVING
    max_concurrency: int = 0  # 0 = the router's default cap

    def cap(self, default_cap: int) -> int:
        return self.max_concurrency or default_cap

    def weight(self) -> float:
        return self.capacity if self.capacity > 0 else 1.0


def choose_pipeline(pipelines: Iterable[Pipeline], running: Mapping[str, int], *,
                    default_cap: int, unavailable: Collection[str] = (),
                    only: str | None = None) -> Pipeline | None:
    """The least-loaded eligible pipeline, or None when every one is full or excluded."""
    best: Pipeline | None = None
    best_key: tuple[float, int, str] | None = None
    for pipeline in pipelines:
        if pipeline.state is not PipelineState.SERVING or pipeline.id in unavailable:
            continue
        if only is not None and pipeline.id != only:
            continue
        load = running.get(pipeline.id, 0)
        if load >= pipeline.cap(default_cap):
            continue
        key = ((load + 1) / pipeline.weight(), load, pipeline.id)
        if best_key is None or key < best_key:
            best, best_key = pipeline, key
    return best
