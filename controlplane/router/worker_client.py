"""gRPC channels to the pipeline drivers, one per address, with the shared token.

Keepalive pings make a driver that vanished without closing its connection (a node that
lost power) fail the stream within seconds instead of hanging it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from spotserve.auth import call_metadata
from spotserve.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

# A stream of token deltas from a driver: Submit, or Attach (a stream taken over).
SubmitCall = grpc.aio.UnaryStreamCall[Any, worker_pb2.TokenDelta]
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


class WorkerClients:
    def __init__(self, token: str | None) -> None:
        self.metadata = tuple(call_metadata(token or ""))
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, worker_pb2_grpc.WorkerStub] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        if address not in self._stubs:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
            self._stubs[address] = worker_pb2_grpc.WorkerStub(channel)
        return self._stubs[address]

    def submit(self, address: str, request: worker_pb2.SubmitRequest,
               timeout: float | None) -> SubmitCall:
        call: SubmitCall = self.stub(address).Submit(
            request, timeout=timeout, metadata=self.metadata)
        return call

    def attach(self, address: str, request_id: str, timeout: float | None) -> SubmitCall:
        call: SubmitCall = self.stub(address).Attach(
            worker_pb2.AttachRequest(request_id=request_id), timeout=timeout,
            metadata=self.metadata)
        return call

    async def lookup(self, address: str, request_id: str,
                     timeout: float) -> worker_pb2.LookupResponse | None:
        """What the driver at `address` holds of the request; None when it does not answer."""
        try:
            reply: worker_pb2.LookupResponse = await self.stub(address).Lookup(
                worker_pb2.LookupRequest(request_id=request_id), timeout=timeout,
                metadata=self.metadata)
            return reply
        except grpc.aio.AioRpcError as exc:
            log.debug("lookup %s on %s: %s", request_id, address, exc.code())
            return None

    async def cancel(self, address: str, request_id: str) -> bool:
        """Best effort (the worker may already be gone): whether it held the request."""
        try:
            reply = await self.stub(address).Cancel(
                worker_pb2.CancelRequest(request_id=request_id), timeout=2.0,
                metadata=self.metadata)
            return bool(reply.found)
        except grpc.aio.AioRpcError as exc:
            log.debug("cancel %s on %s: %s", request_id, address, exc.code())
            return False

    async def retain(self, addresses: set[str]) -> None:
        """Close channels to addresses no longer in the topology."""
        stale = [a for a in self._channels if a not in addresses]
        for address in stale:
            self._stubs.pop(address, None)
            channel = self._channels.pop(address)
            task = asyncio.get_running_loop().create_task(channel.close(grace=5.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels.values()))
        self._channels.clear()
        self._stubs.clear()
