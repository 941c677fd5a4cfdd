"""The gRPC calls the control plane makes to workers and routers, for every backend.

`Wire` is the seam: `GrpcWire` makes the real calls (shared token in the metadata, one
cached channel per address, one retry when a peer is briefly UNAVAILABLE, a deadline on
every call), and tests replace it with a recording fake. Replies are translated into
plain values here, so that the local and the Kubernetes backends read a worker's status,
a drain and a configure the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc

from spotserve.auth import call_metadata
from spotserve.v1 import common_pb2, control_pb2, control_pb2_grpc, worker_pb2, worker_pb2_grpc

from .actuator import ActuatorError, DrainedRequest, Resume, RoutedPipeline

T = TypeVar("T")
STATES = {"serving": control_pb2.PIPELINE_STATE_SERVING,
          "draining": control_pb2.PIPELINE_STATE_DRAINING,
          "gone": control_pb2.PIPELINE_STATE_GONE}
MODES = {"kv": common_pb2.RESUME_MODE_KV, "reprefill": common_pb2.RESUME_MODE_REPREFILL}
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.max_send_message_length", 64 << 20)]
RETRY_AFTER = 0.3  # seconds before the one retry of a call that met UNAVAILABLE


@dataclass(frozen=True)
class WorkerReport:
    """What a worker says of itself and, when it drives one, of its pipeline."""

    epoch: int
    state: str               # standby | loading | ready | draining | drained | stopping
    pipeline_id: str         # the pipeline of its current role ("" without one)
    pipeline_error: str      # why that pipeline broke ("" while it works)
    cached_tokens: int = 0   # KV tokens held: running and paused requests together
    remaining_steps: int = 0  # decode steps until every running request finishes
    decode_step_ms: float = 0.0


@dataclass(frozen=True)
class Configured:
    """A worker's answer to Configure: its state and where its bytes came from."""

    state: str
    kept: int = 0
    pulled: int = 0
    checkpoint: int = 0

    @property
    def moved(self) -> int:
        return self.pulled + self.checkpoint


@dataclass(frozen=True)
class RouterReport:
    """What the router says of itself: the topology epoch it serves (0 after a restart)
    and the requests/s it measured over its sliding window."""

    epoch: int
    rate: float


class Wire(Protocol):
    async def status(self, address: str, timeout: float) -> WorkerReport: ...

    async def drain(self, address: str, epoch: int, steps: int,
                    timeout: float) -> list[DrainedRequest]: ...

    async def configure(self, address: str, request: worker_pb2.ConfigureRequest,
                        timeout: float) -> Configured: ...

    async def topology(self, router: str, epoch: int,
                       pipelines: Sequence[tuple[RoutedPipeline, str]],
                       resume: Sequence[Resume], max_concurrency: int,
                       timeout: float) -> None: ...

    async def router_stats(self, router: str, timeout: float) -> RouterReport: ...

    async def forget(self, address: str) -> None: ...

    async def close(self) -> None: ...


def state_name(state: int) -> str:
    return str(worker_pb2.WorkerState.Name(state)).removeprefix("WORKER_STATE_").lower()


def report_of(status: worker_pb2.WorkerStatus) -> WorkerReport:
    running = [r for r in status.requests if not r.kv_kept]
    left = [max(0, r.max_tokens - r.generated_tokens) for r in running if r.max_tokens]
    return WorkerReport(int(status.epoch), state_name(status.state), status.role.pipeline_id,
                        status.pipeline_error, sum(r.kv_tokens for r in status.requests),
                        max(left, default=0), status.decode_step_seconds * 1000)


def drained_of(reply: worker_pb2.DrainResponse) -> list[DrainedRequest]:
    return [DrainedRequest(r.request_id, r.prompt_tokens, r.generated_tokens,
                           r.kv_tokens if r.kv_kept else 0) for r in reply.requests]


def topology_message(epoch: int, pipelines: Sequence[tuple[RoutedPipeline, str]],
                     resume: Sequence[Resume], max_concurrency: int) -> control_pb2.Topology:
    return control_pb2.Topology(
        epoch=epoch,
        pipelines=[control_pb2.PipelineInfo(
            id=p.pipeline_id, driver_address=address, capacity=p.capacity,
            state=STATES["gone" if not address else p.state],
            max_concurrency=max_concurrency) for p, address in pipelines],
        resume_hints=[control_pb2.ResumeHint(
            request_id=r.request_id, pipeline_id=r.pipeline_id,
            mode=MODES.get(r.mode, common_pb2.RESUME_MODE_UNSPECIFIED),
            kv_tokens=r.kv_tokens) for r in resume])


class GrpcWire:
    """The real calls, with the shared `token` and a deadline on each."""

    def __init__(self, token: str) -> None:
        self.metadata = call_metadata(token)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(
                address, options=CHANNEL_OPTIONS)
        return channel

    async def _call(self, address: str, name: str, timeout: float,
                    call: Callable[[grpc.aio.Channel, float], Awaitable[T]]) -> T:
        """One call within `timeout` seconds, tried again once if the peer was UNAVAILABLE
        (a worker between two epochs); a gRPC error becomes `ActuatorError`."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        for attempt in range(2):
            left = give_up - loop.time()
            try:
                return await call(self._channel(address), max(0.05, left))
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt or \
                        left < 2 * RETRY_AFTER:
                    raise ActuatorError(f"{name} {address}: {exc.code().name} "
                                        f"{exc.details()}") from None
            await asyncio.sleep(RETRY_AFTER)
        raise AssertionError("unreachable")

    async def status(self, address: str, timeout: float) -> WorkerReport:
        reply = await self._call(address, "Status", timeout, lambda ch, t: worker_pb2_grpc.
                                 WorkerStub(ch).Status(worker_pb2.StatusRequest(),
                                                       metadata=self.metadata, timeout=t))
        return report_of(reply)

    async def drain(self, address: str, epoch: int, steps: int,
                    timeout: float) -> list[DrainedRequest]:
        reply = await self._call(address, "Drain", timeout, lambda ch, t: worker_pb2_grpc.
                                 WorkerStub(ch).Drain(worker_pb2.DrainRequest(epoch=epoch,
                                                                              steps=steps),
                                                      metadata=self.metadata, timeout=t))
        return drained_of(reply)

    async def configure(self, address: str, request: worker_pb2.ConfigureRequest,
                        timeout: float) -> Configured:
        reply = await self._call(address, "Configure", timeout, lambda ch, t: worker_pb2_grpc.
                                 WorkerStub(ch).Configure(request, metadata=self.metadata,
                                                          timeout=t))
        return Configured(state_name(reply.state), int(reply.bytes_kept),
                          int(reply.bytes_pulled), int(reply.bytes_from_checkpoint))

    async def topology(self, router: str, epoch: int,
                       pipelines: Sequence[tuple[RoutedPipeline, str]],
                       resume: Sequence[Resume], max_concurrency: int,
                       timeout: float) -> None:
        message = topology_message(epoch, pipelines, resume, max_concurrency)
        await self._call(router, "UpdateTopology", timeout, lambda ch, t: control_pb2_grpc.
                         ControlStub(ch).UpdateTopology(message, metadata=self.metadata,
                                                        timeout=t))

    async def router_stats(self, router: str, timeout: float) -> RouterReport:
        stats = await self._call(router, "Stats", timeout, lambda ch, t: control_pb2_grpc.
                                 ControlStub(ch).Stats(control_pb2.StatsRequest(),
                                                       metadata=self.metadata, timeout=t))
        return RouterReport(int(stats.epoch), float(stats.arrival_rate_window))

    async def forget(self, address: str) -> None:
        """Close the channel to a worker that is gone."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        for address in list(self._channels):
            await self.forget(address)
