"""The gRPC calls the Kubernetes backend makes: worker Status/Drain/Configure and the
router's UpdateTopology and Stats, each with the shared token. `Wire` is the seam tests replace.
Configure requests are built by `controller.configure`, shared with local mode."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

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

    async def status(self, address: str) -> PipelineStatus:
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                s = await worker_pb2_grpc.WorkerStub(channel).Status(
                    worker_pb2.StatusRequest(), metadata=self.metadata, timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                raise ActuatorError(f"Status {address}: {exc.details()}") from exc
        # the worker does not report each request's limit: remaining steps stay unknown (0)
        return PipelineStatus(sum(r.kv_tokens for r in s.requests), 0,
                              s.decode_step_seconds * 1000)

    async def drain(self, address: str, epoch: int, steps: int) -> list[DrainedRequest]:
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                out = await worker_pb2_grpc.WorkerStub(channel).Drain(
                    worker_pb2.DrainRequest(epoch=epoch, steps=steps), metadata=self.metadata,
                    timeout=self.timeout + steps)
            except grpc.aio.AioRpcError as exc:
                raise ActuatorError(f"Drain {address}: {exc.details()}") from exc
        return [DrainedRequest(r.request_id, r.prompt_tokens, r.generated_tokens, r.kv_tokens)
                for r in out.requests]

    async def configure(self, address: str, request: worker_pb2.ConfigureRequest) -> int:
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                # loading weights (a checkpoint read, or peers' pulls) takes minutes
                reply = await worker_pb2_grpc.WorkerStub(channel).Configure(
                    request, metadata=self.metadata, timeout=max(self.timeout, 900.0))
            except grpc.aio.AioRpcError as exc:
                raise ActuatorError(f"Configure {address}: {exc.details()}") from exc
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
        async with grpc.aio.insecure_channel(router) as channel:
            try:
                await control_pb2_grpc.ControlStub(channel).UpdateTopology(
                    message, metadata=self.metadata, timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                raise ActuatorError(f"UpdateTopology {router}: {exc.details()}") from exc

    async def router_stats(self, router: str) -> RouterReport:
        async with grpc.aio.insecure_channel(router) as channel:
            try:
                stats = await control_pb2_grpc.ControlStub(channel).Stats(
                    control_pb2.StatsRequest(), metadata=self.metadata, timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                raise ActuatorError(f"Stats {router}: {exc.details()}") from exc
        return RouterReport(int(stats.epoch), float(stats.arrival_rate_window))
