"""The `PullTensors` side of the Worker service: serve held weight and KV slices to peers.

`TensorServicer` answers from a `TensorStore` (weights) and an optional KV source (the
engine's exported KV, by request, layer, head and token range). The full worker service
extends it with Configure, Submit, Drain and the rest.

The same slices go out over the bulk port (`bulk.BulkServer`) once `start_bulk` has
opened it: `OpenBulkPull` checks the request exactly as `PullTensors` does and answers a
one-time ticket for the bulk connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from spotserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from spotserve.worker.bulk import BulkServer
from spotserve.worker.tensor_store import SliceError, TensorStore
from spotserve.worker.transfer import Blob, chunk_size, chunk_stream

KVSource = Callable[[common_pb2.KVSlice], Blob]
MAX_SLICES_PER_CALL = 4096


class TensorServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, store: TensorStore, kv_source: KVSource | None = None) -> None:
        self.store = store
        self.kv_source = kv_source
        self.bytes_out = 0
        self.bulk = BulkServer()

    async def start_bulk(self, host: str, port: int = 0, *, send_bytes_per_s: float = 0.0,
                         on_sent: Callable[[int], None] | None = None) -> int:
        """Open the bulk port on `host:port` (0: any); the port bound. Until this is
        called `OpenBulkPull` answers FAILED_PRECONDITION and peers use `PullTensors`."""
        if self.bulk.running:
            raise RuntimeError(f"the bulk port is already open on {self.bulk.port}")
        self.bulk = BulkServer(send_bytes_per_s=send_bytes_per_s, on_sent=on_sent)
        return await self.bulk.start(host, port)

    async def stop_bulk(self) -> None:
        await self.bulk.stop()

    def _blobs(self, request: worker_pb2.PullTensorsRequest) -> list[Blob]:
        blobs = [self.store.select(w) for w in request.weights]
        for kv in request.kv:
            if self.kv_source is None:
                raise SliceError(f"no KV cache held (request {kv.request_id!r})")
            blobs.append(self.kv_source(kv))
        return blobs

    async def _checked(self, request: worker_pb2.PullTensorsRequest,
                       context: grpc.aio.ServicerContext[Any, Any]) -> tuple[list[Blob], int]:
        """The request's blobs and chunk size, or the call aborted with a clear error."""
        count = len(request.weights) + len(request.kv)
        if count == 0 or count > MAX_SLICES_PER_CALL:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"ask for 1 to {MAX_SLICES_PER_CALL} slices per call (got {count})")
        try:
            return self._blobs(request), chunk_size(request.chunk_bytes)
        except SliceError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except (ValueError, KeyError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def PullTensors(self, request: worker_pb2.PullTensorsRequest,
                          context: grpc.aio.ServicerContext[Any, Any]
                          ) -> AsyncIterator[worker_pb2.TensorChunk]:
        blobs, size = await self._checked(request, context)
        for chunk in chunk_stream(blobs, size):
            self.bytes_out += len(chunk.data)
            yield chunk

    async def OpenBulkPull(self, request: worker_pb2.PullTensorsRequest,
                           context: grpc.aio.ServicerContext[Any, Any]) -> worker_pb2.BulkTicket:
        if not self.bulk.running:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no bulk port open")
        blobs, _ = await self._checked(request, context)
        ticket = self.bulk.offer([b.data for b in blobs])
        return worker_pb2.BulkTicket(ticket=ticket, port=self.bulk.port,
                                     total_bytes=[b.data.nbytes for b in blobs],
                                     ttl_ms=int(self.bulk.ticket_ttl_s * 1000))
