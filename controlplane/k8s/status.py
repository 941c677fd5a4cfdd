"""The LLMService status, built from what the operator observed (pure).

A merge patch replaces lists, so every patch carries the whole `conditions` list; a
condition keeps its `lastTransitionTime` while its status stays the same. `Ready` is True
exactly when `WorkersReady`, `RouterReady` and `CapacityAvailable` are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .spec import Problem

CONDITIONS = ("Ready", "WorkersReady", "RouterReady", "CapacityAvailable", "Progressing",
              "Degraded", "Migrating")
# controller phase → status.migration.phase
MIGRATION_PHASES: Mapping[str, str] = {
    "planning": "Planning", "planned": "Planning", "preloading": "Preloading",
    "abandoning": "Draining", "draining": "Draining",
    "configuring": "Transferring",
    "switching": "Switching", "releasing": "CleaningUp", "serving": "Completed",
    "idle": "Completed",
    "completed": "Completed", "failed": "Failed"}
ACTIVE = ("Planning", "Preloading", "Draining", "Transferring", "Switching", "CleaningUp")
MAX_ERRORS = 10


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Slot:
    """One placed GPU: where it is and whether its pod is ready."""

    pipeline: int
    stage: int
    tensor_rank: int
    pod: str
    node: str
    pool: str
    capacity: str
    gpu_type: str
    zone: str
    address: str
    ready: bool


@dataclass(frozen=True)
class Shape:
    data: int
    pipeline: int
    tensor: int
    batch: int
    stages: tuple[tuple[int, int, int, str], ...] = ()  # firstLayer, endLayer, tensor, gpu

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "pipeline": self.pipeline, "tensor": self.tensor,
                "batch": self.batch,
                "summary": f"{self.data}/{self.pipeline}/{self.tensor}",
                "stages": [{"firstLayer": a, "endLayer": b, "tensor": t,
                            **({"gpuType": g} if g else {})} for a, b, t, g in self.stages]}


@dataclass(frozen=True)
class Migration:
    id: str
    phase: str                 # controller phase (see MIGRATION_PHASES)
    reason: str = ""
    notice_source: str | None = None
    nodes: tuple[str, ...] = ()
    started_at: float | None = None
    deadline: float | None = None
    bytes_planned: int = 0
    bytes_moved: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id,
                               "phase": MIGRATION_PHASES.get(self.phase, "Planning"),
                               "reason": self.reason[:1024], "nodes": list(self.nodes),
                               "bytesPlanned": int(self.bytes_planned),
                               "bytesMoved": int(self.bytes_moved)}
        if self.notice_source in ("aws", "gcp", "azure", "other"):
            out["noticeSource"] = self.notice_source
        if self.started_at is not None:
            out["startedAt"] = rfc3339(self.started_at)
        if self.deadline is not None:
            out["deadline"] = rfc3339(self.deadline)
        return out


@dataclass(frozen=True)
class Observed:
    """Everything the status is derived from."""

    generation: int
    now: float
    problems: Sequence[Problem] = ()
    current: Shape | None = None
    target: Shape | None = None
    slots: Sequence[Slot] = ()
    migration: Migration | None = None
    router_ready: bool = False
    capacity_available: bool = False
    capacity_message: str = ""
    pending_instances: int = 0
    endpoint: Mapping[str, str] | None = None
    selector: str = ""
    failures: Sequence[Problem] = ()  # backend failures since the last patch (lastErrors only)
    controller: Mapping[str, Any] | None = None  # the controller's state, to resume from


def condition(kind: str, ok: bool, reason: str, message: str, generation: int, now: float,
              previous: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    status = "True" if ok else "False"
    old = previous.get(kind) or {}
    since = old.get("lastTransitionTime") if old.get("status") == status else None
    return {"type": kind, "status": status, "observedGeneration": generation,
            "lastTransitionTime": since or rfc3339(now), "reason": reason,
            "message": message[:32768]}


def conditions(seen: Observed, previous: Sequence[Mapping[str, Any]] = ()
               ) -> list[dict[str, Any]]:
    """The full conditions list (every type, always)."""
    prev = {str(c.get("type")): c for c in previous if isinstance(c, Mapping)}
    gen, now = seen.generation, seen.now
    ready_workers = sum(s.ready for s in seen.slots)
    workers_ok = bool(seen.slots) and ready_workers == len(seen.slots)
    problem = seen.problems[0] if seen.problems else None
    phase = seen.migration.to_dict()["phase"] if seen.migration else "Completed"
    migrating = phase in ACTIVE
    out = [
        condition("WorkersReady", workers_ok, "AllReady" if workers_ok else "WorkersNotReady",
                  f"{ready_workers}/{len(seen.slots)} worker pods ready", gen, now, prev),
        condition("RouterReady", seen.router_ready,
                  "Available" if seen.router_ready else "RouterNotReady",
                  "router serves the current topology" if seen.router_ready
                  else "router not available yet", gen, now, prev),
        condition("CapacityAvailable", seen.capacity_available,
                  "Sufficient" if seen.capacity_available else "InsufficientCapacity",
                  seen.capacity_message, gen, now, prev),
        condition("Progressing", migrating or bool(seen.target),
                  "Reconfiguring" if migrating else "Stable",
                  seen.migration.reason if seen.migration and migrating else "", gen, now,
                  prev),
        condition("Degraded", problem is not None,
                  _reason(problem.field) if problem else "AsExpected",
                  "; ".join(str(p) for p in seen.problems), gen, now, prev),
        condition("Migrating", migrating, phase, seen.migration.reason
                  if seen.migration else "", gen, now, prev),
    ]
    ready = workers_ok and seen.router_ready and seen.capacity_available and problem is None
    failing = [c["type"] for c in out[:3] if c["status"] != "True"]
    out.insert(0, condition("Ready", ready, "Ready" if ready else "NotReady",
                            "serving" if ready else "waiting for " + ", ".join(
                                failing or ["a valid spec"]), gen, now, prev))
    return out


def _reason(field_path: str) -> str:
    """`spec.instances.min` → `InvalidSpecInstancesMin` (a CamelCase condition reason)."""
    words = [w for w in field_path.replace("[", ".").replace("]", "").split(".") if w]
    return "Invalid" + "".join(w[:1].upper() + w[1:] for w in words if not w.isdigit())


def error_entries(problems: Sequence[Problem], now: float,
                  previous: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """`lastErrors`: these problems first, then the older entries, at most ten."""
    fresh = [{"time": rfc3339(now), "reason": _reason(p.field), "field": p.field,
              "message": p.message} for p in problems]
    known = {(e.get("field"), e.get("message")) for e in fresh}
    older = [dict(e) for e in previous if (e.get("field"), e.get("message")) not in known]
    return (fresh + older)[:MAX_ERRORS]


def build(seen: Observed, previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The status patch (a complete status: lists in it replace the old ones)."""
    previous = previous or {}
    slots = seen.slots
    instances = {s.node: s for s in slots}
    ready_nodes = {s.node for s in slots if s.ready}
    out: dict[str, Any] = {
        "observedGeneration": seen.generation,
        "conditions": conditions(seen, previous.get("conditions") or ()),
        "parallelism": {**({"current": seen.current.to_dict()} if seen.current else {}),
                        **({"target": seen.target.to_dict()} if seen.target else {})},
        "placement": [_slot(s) for s in slots],
        "replicas": {"instances": len(ready_nodes),
                     "spotInstances": sum(s.capacity == "spot" for s in instances.values()),
                     "onDemandInstances": sum(s.capacity == "on-demand"
                                              for s in instances.values()),
                     "pendingInstances": seen.pending_instances,
                     "workers": len(slots), "readyWorkers": sum(s.ready for s in slots)},
        "selector": seen.selector,
        "lastErrors": error_entries([*seen.problems, *seen.failures], seen.now,
                                    previous.get("lastErrors") or ()),
    }
    if seen.migration is not None:
        out["migration"] = seen.migration.to_dict()
    if seen.endpoint:
        out["endpoint"] = dict(seen.endpoint)
    if seen.controller is not None:
        out["controller"] = dict(seen.controller)
    return out


def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: what `new` has, plus a
    null for every key of `old` it lacks (a merge patch keeps keys it does not name)."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return new
    out = {k: merge_patch(old.get(k), v) for k, v in new.items()}
    out.update({k: None for k in old if k not in new})
    return out


def _slot(s: Slot) -> dict[str, Any]:
    out: dict[str, Any] = {"pipeline": s.pipeline, "stage": s.stage,
                           "tensorRank": s.tensor_rank, "pod": s.pod, "node": s.node,
                           "pool": s.pool, "gpuType": s.gpu_type, "zone": s.zone,
                           "address": s.address}
    if s.capacity in ("spot", "on-demand"):
        out["capacityType"] = s.capacity
    return out
