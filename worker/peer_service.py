"""The `PullTensors` side of the Worker service: serve held weight and KV slices to peers.

`TensorServicer` answers from a `TensorStore` (weights) and an optional KV source (the
engine's exported KV, by request, layer, head and token range). The full worker service
extends it with Configure, Submit, Drain and the rest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from spotserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from spotserve.worker.tensor_store import SliceError, TensorStore
from spotserve.worker.transfer import Blob, chunk_size, chunk_stream

KVSource = Callable[[common_pb2.KVSlice], Blob]
MAX_SLICES_PER_CALL = 4096


class TensorServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, store: TensorStore, kv_source: KVSource | None = None) -> None:
        self.store = store
        self.kv_source = kv_source
        self.bytes_out = 0

    def _blobs(self, request: worker_pb2.PullTensorsRequest) -> list[Blob]:
        blobs = [self.store.select(w) for w in request.weights]
        for kv in request.kv:
            if self.kv_source is None:
                raise SliceError(f"no KV cache held (request {kv.request_id!r})")
            blobs.append(self.kv_source(kv))
        return blobs

    async def PullTensors(self, request: worker_pb2.PullTensorsRequest,
                          context: grpc.aio.ServicerContext[Any, Any]
                          ) -> AsyncIterator[worker_pb2.TensorChunk]:
        count = len(request.weights) + len(request.kv)
        if count == 0 or count > MAX_SLICES_PER_CALL:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"ask for 1 to {MAX_SLICES_PER_CALL} slices per call (got {count})")
        try:
            size = chunk_size(request.chunk_bytes)
            blobs = self._blobs(request)
        except SliceError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except (ValueError, KeyError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        for chunk in chunk_stream(blobs, size):
            self.bytes_out += len(chunk.data)
            yield chunk
