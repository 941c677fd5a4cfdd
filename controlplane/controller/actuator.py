"""The contract between the controller and a backend (local processes or Kubernetes).

Every method is a coroutine and may be called again for the same epoch after a controller
restart, so each must be idempotent: configuring a worker for an epoch it already serves,
draining a pipeline that already stopped, or releasing an instance already gone are no-ops.
Methods raise `ActuatorError` for failures the controller should record and re-plan around
(a worker that does not answer, say); anything else is a bug. The controller runs every
call under a deadline and cancels it when an urgent event arrives, so a method must also
be safe to cancel at any await.

`start(sink)` hands the backend the controller's event sink for events it discovers itself
(a wedged worker replaced, a pipeline its workers report broken); `stop()` ends that.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from ..planner.cluster import GpuId
from .epoch import WorkerAssignment
from .events import Event

Sink = Callable[[Event], Awaitable[None]]


class ActuatorError(RuntimeError):
    """A backend operation failed in a way the controller can plan around."""


@dataclass(frozen=True)
class PipelineStatus:
    """A serving pipeline's batch as its driver reports it."""

    cached_tokens: int = 0       # KV tokens held, all requests together
    remaining_steps: int = 0     # decode steps until the whole batch finishes
    decode_step_ms: float = 0.0  # measured; 0 = unknown (the cost model estimates it)
    state: str = "ready"         # the driver's state: ready, draining, drained, standby...
    error: str = ""              # why the pipeline broke ("" while it works)

    @property
    def broken(self) -> bool:
        """Its KV caches are lost: a peer died, or the driver moved on."""
        return bool(self.error)


@dataclass(frozen=True)
class DrainedRequest:
    """A request stopped by a drain with its KV kept (`kv_tokens` of it)."""

    request_id: str
    prompt_tokens: int
    generated_tokens: int
    kv_tokens: int


@dataclass(frozen=True)
class RoutedPipeline:
    pipeline_id: str
    driver: GpuId
    capacity: float
    state: str = "serving"  # serving | draining | gone


@dataclass(frozen=True)
class Resume:
    """Where an interrupted request continues: `mode` is "kv" or "reprefill"."""

    request_id: str
    pipeline_id: str
    mode: str
    kv_tokens: int = 0


class Actuator(ABC):
    @abstractmethod
    async def progress(self) -> Mapping[str, PipelineStatus]:
        """Pipeline id → its driver's report, for the pipelines that answer."""

    async def start(self, sink: Sink) -> None:
        """Begin reporting events the backend discovers itself to `sink`."""
        return None

    async def stop(self) -> None:
        """Stop reporting events (the controller is stopping)."""
        return None

    @abstractmethod
    async def drain(self, epoch: int, pipeline_id: str, driver: GpuId,
                    steps: int, timeout: float) -> Sequence[DrainedRequest]:
        """Let the pipeline run exactly `steps` more decode steps, then stop keeping KV;
        give up (`ActuatorError`) after `timeout` seconds."""

    def unresponsive(self) -> frozenset[str]:
        """Instances with a worker that has stopped answering (not yet replaced): no plan
        should count on them, or wait for them."""
        return frozenset()

    async def abandon(self, pipeline_ids: Sequence[str]) -> None:
        """Broken pipelines: take them out of the router's rotation now, so that their
        requests resume elsewhere at once instead of after the migration."""
        return None

    @abstractmethod
    async def configure(self, epoch: int, jobs: Mapping[GpuId, WorkerAssignment],
                        kv: Mapping[int, Sequence[DrainedRequest]]) -> int:
        """Put every GPU of `jobs` into its role for `epoch`; `kv` lists, per old pipeline,
        the drained requests whose KV the new owners import. Returns, when all are ready,
        the bytes the workers pulled from peers or read from the checkpoint. Jobs marked
        `unchanged` must be left serving undisturbed."""

    async def preload(self, epoch: int, jobs: Mapping[GpuId, WorkerAssignment],
                      gpus: Sequence[GpuId]) -> int:
        """Concurrent initialization: let `gpus` (idle now, joining the configuration of
        `epoch`) gather the weights of their role in `jobs` while the current configuration
        keeps serving, so that `configure` for the same epoch finds them in memory. Returns
        the bytes gathered. A backend that cannot preload keeps this default, and
        `configure` gathers everything."""
        return 0

    @abstractmethod
    async def set_topology(self, epoch: int, pipelines: Sequence[RoutedPipeline],
                           resume: Sequence[Resume]) -> None:
        """Tell the router which pipelines serve and where interrupted requests resume."""

    @abstractmethod
    async def release(self, instances: Sequence[str]) -> None:
        """Give back instances the configuration no longer uses."""

    @abstractmethod
    async def request_capacity(self, instance_type: str, count: int, capacity: str) -> None:
        """Ask for `count` more instances (spot first; `capacity` says which kind)."""
