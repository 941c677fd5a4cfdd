"""Events the controller reacts to. Backends (the cloud emulator, the Kubernetes node
watcher, the router's load signal) produce them; the controller consumes them in order."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceBooting:
    """Capacity was requested or is starting: not usable yet."""

    name: str
    instance_type: str
    capacity: str = "spot"
    zone: str = ""


@dataclass(frozen=True)
class InstanceReady:
    """An instance joined: its workers answer and it can take a position."""

    name: str
    instance_type: str
    capacity: str = "spot"
    zone: str = ""


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


Event = InstanceBooting | InstanceReady | NoticeReceived | InstanceLost | LoadChanged


def is_urgent(event: Event) -> bool:
    """Events that must interrupt a migration in progress (data is about to vanish)."""
    return isinstance(event, NoticeReceived | InstanceLost)
