"""The gRPC calls the Kubernetes backend makes: worker Status/Drain/Configure and the
router's UpdateTopology and Stats, each with the shared token. `Wire` is the seam tests replace.
Configure requests are built by `controller.configure`, shared with local mode."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc

from spotserve.auth import call_metadata
from spotserve.v1 import common_pb2, control_pb2, control_pb2_grpc, worker_pb2, worker_pb2_grpc

from ..controller.actuator import (
    ActuatorError,
    DrainedRequest,
    PipelineStatus,
    Resume,
    RoutedPipeline,
)

STATES = {"serving": control_pb2.PIPELINE_STATE_SERVING,
          "draining": control_pb2.PIPELINE_STATE_DRAINING,
          "gone": control_pb2.PIPELINE_STATE_GONE}
T = TypeVar("T")
MODES = {"kv": common_pb2.RESUME_MODE_KV, "reprefill": common_pb2.RESUME_MODE_REPREFILL}


@dataclass(frozen=True)
class RouterReport:
    """What the router says of itself: the topology epoch it serves (0 after a restart)
    and the requests/s it measured over its sliding window."""

    epoch: int
    rate: float


class Wire(Protocol):
    async def status(self, address: str) -> PipelineStatus: ...

    async def drain(self, address: str, epoch: int, steps: int) -> list[DrainedRequest]: ...

    async def configure(self, address: str, request: worker_pb2.ConfigureRequest) -> int:
        """Configure one worker; returns the bytes it pulled or read from the checkpoint."""

    async def topology(self, router: str, epoch: int,
                       pipelines: Sequence[tuple[RoutedPipeline, str]],
                       resume: Sequence[Resume]) -> None: ...

    async def router_stats(self, router: str) -> RouterReport: ...


class GrpcWire:
    """The real calls. `addresses` maps a GPU id (`node/index`) to its worker's host:port."""

    def __init__(self, token: str, timeout: float = 30.0) -> None:
        self.metadata = call_metadata(token)
        self.timeout = timeout

    async def _call(self, address: str, name: str,
                    call: Callable[[grpc.aio.Channel], Awaitable[T]]) -> T:
        """One call on a fresh channel; a gRPC error becomes `ActuatorError`."""
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                return await call(channel)
            except grpc.aio.AioRpcError as exc:
                raise ActuatorError(f"{name} {address}: {exc.details()}") from exc

    async def status(self, address: str) -> PipelineStatus:
        s = await self._call(address, "Status", lambda ch: worker_pb2_grpc.WorkerStub(ch).Status(
            worker_pb2.StatusRequest(), metadata=self.metadata, timeout=self.timeout))
        # the worker does not report each request's limit: remaining steps stay unknown (0)
        return PipelineStatus(sum(r.kv_tokens for r in s.requests), 0,
                              s.decode_step_seconds * 1000)

    async def drain(self, address: str, epoch: int, steps: int) -> list[DrainedRequest]:
        out = await self._call(address, "Drain", lambda ch: worker_pb2_grpc.WorkerStub(ch).Drain(
            worker_pb2.DrainRequest(epoch=epoch, steps=steps), metadata=self.metadata,
            timeout=self.timeout + steps))
        return [DrainedRequest(r.request_id, r.prompt_tokens, r.generated_tokens, r.kv_tokens)
                for r in out.requests]

    async def configure(self, address: str, request: worker_pb2.ConfigureRequest) -> int:
        # loading weights (a checkpoint read, or peers' pulls) takes minutes
        reply = await self._call(
            address, "Configure", lambda ch: worker_pb2_grpc.WorkerStub(ch).Configure(
                request, metadata=self.metadata, timeout=max(self.timeout, 900.0)))
        return int(reply.bytes_pulled + reply.bytes_from_checkpoint)

    async def topology(self, router: str, epoch: int,
                       pipelines: Sequence[tuple[RoutedPipeline, str]],
                       resume: Sequence[Resume]) -> None:
        message = control_pb2.Topology(
            epoch=epoch,
            pipelines=[control_pb2.PipelineInfo(id=p.pipeline_id, driver_address=address,
                                                capacity=p.capacity, state=STATES[p.state])
                       for p, address in pipelines],
            resume_hints=[control_pb2.ResumeHint(request_id=r.request_id,
                                                 pipeline_id=r.pipeline_id,
                                                 mode=MODES.get(
                                                     r.mode, common_pb2.RESUME_MODE_UNSPECIFIED),
                                                 kv_tokens=r.kv_tokens) for r in resume])
        await self._call(router, "UpdateTopology",
                         lambda ch: control_pb2_grpc.ControlStub(ch).UpdateTopology(
                             message, metadata=self.metadata, timeout=self.timeout))

    async def router_stats(self, router: str) -> RouterReport:
        stats = await self._call(router, "Stats", lambda ch: control_pb2_grpc.ControlStub(ch).Stats(
            control_pb2.StatsRequest(), metadata=self.metadata, timeout=self.timeout))
        return RouterReport(int(stats.epoch), float(stats.arrival_rate_window))
