"""Events the controller reacts to. Backends (the cloud emulator, the Kubernetes node
watcher, the workers' health monitor, the router's load signal) produce them; the
controller consumes them in order."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceBooting:
    """Capacity was requested or is starting: not usable yet."""

    name: str
    instance_type: str
    capacity: str = "spot"
    zone: str = ""
    gpus: int = 0  # GPUs it offers, when fewer than its type has (a shared node)


@dataclass(frozen=True)
class InstanceReady:
    """An instance joined: its workers answer and it can take a position."""

    name: str
    instance_type: str
    capacity: str = "spot"
    zone: str = ""
    gpus: int = 0  # GPUs it offers, when fewer than its type has (a shared node)


@dataclass(frozen=True)
class NoticeReceived:
    """A termination notice: the instance is gone at `deadline` (Unix seconds)."""

    name: str
    deadline: float
    source: str = ""


@dataclass(frozen=True)
class InstanceLost:
    """The instance vanished (after its notice, or without one)."""

    name: str


@dataclass(frozen=True)
class LoadChanged:
    """The required request rate (requests/s) changed beyond the re-plan threshold."""

    rate: float


@dataclass(frozen=True)
class PipelineBroken:
    """A serving pipeline's workers report it broken (a peer died or stopped answering):
    its KV caches are lost; its surviving GPUs still hold their weights."""

    pipeline_id: str
    reason: str = ""


@dataclass(frozen=True)
class WorkerRestarted:
    """A GPU's worker was wedged (or crashed) and was replaced by a fresh one: the GPU
    holds nothing now, though its instance lives on."""

    name: str       # the instance
    gpu: int
    reason: str = ""


Event = InstanceBooting | InstanceReady | NoticeReceived | InstanceLost | LoadChanged | \
    PipelineBroken | WorkerRestarted


def is_urgent(event: Event) -> bool:
    """Events that must interrupt a migration in progress (data is about to vanish, or
    already has)."""
    return isinstance(event, NoticeReceived | InstanceLost | PipelineBroken | WorkerRestarted)
