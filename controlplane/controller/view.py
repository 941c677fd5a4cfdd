"""The controller's view of the instances: booting → ready → notice(deadline) → gone.

`ClusterView.apply(event, now)` is pure and idempotent (the Kubernetes API replays
objects), and `planner_instances` translates the view into the planner's `Instance`s:
ready instances are `running` when the current placement uses them and `joining`
otherwise, instances under notice are `doomed`, gone ones `lost`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from spotserve.catalog import Catalog

from ..planner.cluster import Instance
from .events import (
    Event,
    InstanceBooting,
    InstanceLost,
    InstanceReady,
    LoadChanged,
    NoticeReceived,
    PipelineBroken,
    WorkerRestarted,
)

BOOTING, READY, NOTICE, GONE = "booting", "ready", "notice", "gone"


@dataclass(frozen=True)
class InstanceRecord:
    name: str
    instance_type: str
    capacity: str = "spot"
    zone: str = ""
    state: str = BOOTING
    deadline: float | None = None
    since: float = 0.0
    gpus: int = 0  # GPUs the service may use, when fewer than the type's (0: all)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "instance_type": self.instance_type,
                "capacity": self.capacity, "zone": self.zone, "state": self.state,
                "deadline": self.deadline, "since": self.since, "gpus": self.gpus}


@dataclass(frozen=True)
class ClusterView:
    instances: Mapping[str, InstanceRecord] = field(default_factory=dict)
    rate: float = 0.0

    def apply(self, event: Event, now: float) -> ClusterView:
        """The view after `event`. Replays and stale events change nothing."""
        if isinstance(event, LoadChanged):
            return replace(self, rate=max(0.0, event.rate))
        if isinstance(event, PipelineBroken | WorkerRestarted):
            return self  # the instances are as they were; the controller tracks these
        old = self.instances.get(event.name)
        new = _next(old, event, now)
        if new is None or new == old:
            return self
        return replace(self, instances={**self.instances, event.name: new})

    def in_state(self, *states: str) -> list[InstanceRecord]:
        return sorted((r for r in self.instances.values() if r.state in states),
                      key=lambda r: r.name)

    def earliest_deadline(self) -> float | None:
        deadlines = [r.deadline for r in self.in_state(NOTICE) if r.deadline is not None]
        return min(deadlines) if deadlines else None

    def planner_instances(self, catalog: Catalog, used: Iterable[str] = (),
                          spot_prices: Mapping[str, float] | None = None) -> tuple[Instance, ...]:
        placed = set(used)
        states = {READY: "running", NOTICE: "doomed", GONE: "lost"}
        out = []
        for record in self.in_state(READY, NOTICE, GONE):
            state = states[record.state]
            if state == "running" and record.name not in placed:
                state = "joining"
            if state == "lost" and record.name not in placed:
                continue  # gone and held nothing: irrelevant
            kind = catalog.instance(record.instance_type)
            if 0 < record.gpus < kind.gpus:  # a node shared with other GPU pods
                kind = replace(kind, gpus=record.gpus)
            out.append(Instance(record.name, kind, record.capacity, record.zone, state,
                                (spot_prices or {}).get(record.instance_type)))
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return {"rate": self.rate,
                "instances": [r.to_dict() for r in self.instances.values()]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClusterView:
        records = {d["name"]: InstanceRecord(**d) for d in data.get("instances", [])}
        return cls(records, float(data.get("rate", 0.0)))


def _next(old: InstanceRecord | None, event: Event, now: float) -> InstanceRecord | None:
    if isinstance(event, InstanceBooting | InstanceReady):
        if old is not None and old.state in (NOTICE, GONE):
            return old  # a doomed or dead instance does not come back under the same name
        state = READY if isinstance(event, InstanceReady) else BOOTING
        if old is not None and old.state == READY:
            state = READY
        since = old.since if old is not None and old.state == state else now
        return InstanceRecord(event.name, event.instance_type, event.capacity, event.zone,
                              state, None, since, event.gpus)
    if old is None:
        return None  # a notice or loss for an instance we never saw
    if isinstance(event, NoticeReceived):
        if old.state == GONE:
            return old
        deadline = event.deadline if old.deadline is None else min(old.deadline, event.deadline)
        return replace(old, state=NOTICE, deadline=deadline,
                       since=old.since if old.state == NOTICE else now)
    if isinstance(event, InstanceLost):
        return old if old.state == GONE else replace(old, state=GONE, since=now)
    return old
