"""Tensor streaming between workers: weight and KV slices, CRC-32 checked.

Client side, `pull` fetches many slices from their holders over several concurrent
streams, writes every byte straight into the caller's destination buffer, verifies each
slice's checksum, and when a holder fails mid-stream retries the unfinished slices from
the next holder. Slices are scheduled in the order given, so callers list data held only
by doomed workers first.

A stream uses the holder's bulk port when it has one (`bulk`: plain TCP negotiated by the
`OpenBulkPull` call, same checks and checksums, 4 to 6 times the throughput of a gRPC
stream); a holder without one, or whose port does not answer, streams `PullTensors`:
`chunk_stream` cuts the buffers it holds into ~1 MiB `TensorChunk` messages.

This module knows bytes, not tensors: callers pass contiguous buffers (a torch tensor's
`view(torch.uint8).numpy()`, say), which keeps it torch-free and testable on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from spotserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from spotserve.worker import bulk
from spotserve.worker.checksum import crc32

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 4 << 20
# gRPC message limit for worker channels: one chunk plus headers, with room to spare.
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + (1 << 20)
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


@dataclass(frozen=True)
class Blob:
    """One held slice: its dtype name, shape and contiguous bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview


def chunk_size(requested: int) -> int:
    """The chunk size to use for a request's `chunk_bytes` (0 = default)."""
    if requested == 0:
        return DEFAULT_CHUNK_BYTES
    if not 0 < requested <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be at most {MAX_CHUNK_BYTES} (got {requested})")
    return requested


def chunk_stream(blobs: Sequence[Blob], chunk_bytes: int) -> Iterator[worker_pb2.TensorChunk]:
    """The chunks of every blob in order; the last chunk of each carries its CRC-32."""
    for index, blob in enumerate(blobs):
        data = blob.data.cast("B") if blob.data.format != "B" else blob.data
        total, crc, offset = data.nbytes, 0, 0
        while True:
            piece = data[offset:offset + chunk_bytes]
            crc = crc32(piece, crc)
            last = offset + len(piece) >= total
            first = offset == 0
            yield worker_pb2.TensorChunk(
                index=index, dtype=blob.dtype if first else "",
                shape=blob.shape if first else (), total_bytes=total, offset=offset,
                data=bytes(piece), last=last, crc32=crc if last else 0)
            if last:
                break
            offset += len(piece)


# ---- client ----------------------------------------------------------------------------
@dataclass
class PullItem:
    """One slice to fetch into `dest` (writable, exactly its size) from `holders` (worker
    addresses, most preferred first)."""

    dest: memoryview
    holders: list[str]
    weight: common_pb2.TensorSlice | None = None
    kv: common_pb2.KVSlice | None = None

    def describe(self) -> str:
        if self.weight is not None:
            w = self.weight
            return f"{w.tensor}[{w.start}:{w.stop}]" if w.dim >= 0 else w.tensor
        assert self.kv is not None
        return f"kv {self.kv.request_id} layers {self.kv.layer_start}-{self.kv.layer_end}"


class TransferError(RuntimeError):
    """Some slices could not be fetched from any holder; `failed` lists them."""

    def __init__(self, failed: list[PullItem], reasons: list[str]) -> None:
        self.failed = failed
        shown = ", ".join(i.describe() for i in failed[:5])
        more = f" (+{len(failed) - 5} more)" if len(failed) > 5 else ""
        super().__init__(f"no holder could serve {shown}{more}: {'; '.join(reasons[-3:])}")


@dataclass
class PullStats:
    bytes: int = 0
    streams: int = 0
    retries: int = 0
    bulk_bytes: int = 0   # of `bytes`, those that came over bulk ports
    seconds: float = 0.0
    by_peer: dict[str, int] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


class _ChecksumError(RuntimeError):
    pass


def _batches(items: list[PullItem], streams_per_peer: int) -> list[tuple[str, list[PullItem]]]:
    """Group items by their current holder, then deal each group over up to
    `streams_per_peer` streams, balancing bytes; order within a batch is preserved."""
    by_peer: dict[str, list[PullItem]] = {}
    for item in items:
        by_peer.setdefault(item.holders[0], []).append(item)
    out: list[tuple[str, list[PullItem]]] = []
    for peer, group in by_peer.items():
        lanes: list[list[PullItem]] = [[] for _ in range(min(streams_per_peer, len(group)))]
        loads = [0] * len(lanes)
        for item in group:
            lane = loads.index(min(loads))
            lanes[lane].append(item)
            loads[lane] += item.dest.nbytes
        out.extend((peer, lane) for lane in lanes)
    return out


def _request(batch: list[PullItem], epoch: int, chunk_bytes: int
             ) -> tuple[worker_pb2.PullTensorsRequest, list[PullItem]]:
    """The request for a batch, and its items in the order the holder answers them
    (weights first, then KV, each in request order)."""
    request = worker_pb2.PullTensorsRequest(
        epoch=epoch, chunk_bytes=chunk_bytes,
        weights=[i.weight for i in batch if i.weight is not None],
        kv=[i.kv for i in batch if i.kv is not None])
    order = [i for i in batch if i.weight is not None] + [i for i in batch if i.kv is not None]
    return request, order


def _check_size(item: PullItem, total_bytes: int) -> None:
    if total_bytes != item.dest.nbytes:
        raise _ChecksumError(f"{item.describe()}: holder sent {total_bytes} bytes, "
                             f"expected {item.dest.nbytes}")


async def _pull_batch(stub: worker_pb2_grpc.WorkerStub, batch: list[PullItem], epoch: int,
                      chunk_bytes: int, metadata: Sequence[tuple[str, str]],
                      done: set[int]) -> int:
    request, order = _request(batch, epoch, chunk_bytes)
    crcs = [0] * len(order)
    received = 0
    async for chunk in stub.PullTensors(request, metadata=metadata):
        if chunk.index >= len(order):
            raise _ChecksumError(f"chunk for unknown slice {chunk.index}")
        item, data = order[chunk.index], chunk.data   # each read of .data is a copy
        end = chunk.offset + len(data)
        _check_size(item, max(chunk.total_bytes, end))
        item.dest[chunk.offset:end] = data
        crcs[chunk.index] = crc32(data, crcs[chunk.index])
        received += len(data)
        if chunk.last:
            if crcs[chunk.index] != chunk.crc32:
                raise _ChecksumError(f"{item.describe()}: checksum mismatch")
            done.add(id(item))
    return received


class _NoBulkPort(Exception):
    pass


async def _pull_bulk(stub: worker_pb2_grpc.WorkerStub, host: str, batch: list[PullItem],
                     epoch: int, chunk_bytes: int, metadata: Sequence[tuple[str, str]],
                     done: set[int]) -> int:
    request, order = _request(batch, epoch, chunk_bytes)
    try:
        ticket = await stub.OpenBulkPull(request, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION):
            raise _NoBulkPort from exc
        raise
    if len(ticket.total_bytes) != len(order):
        raise _ChecksumError(f"holder offered {len(ticket.total_bytes)} slices of {len(order)}")
    for item, total in zip(order, ticket.total_bytes, strict=True):
        _check_size(item, total)
    return await bulk.fetch(host, ticket.port, ticket.ticket, [i.dest for i in order],
                            on_slice=lambda k: done.add(id(order[k])))


def _host(address: str) -> str:
    """The host part of a `host:port` worker address ([v6] brackets removed)."""
    return address.rsplit(":", 1)[0].strip("[]")


async def pull(items: Sequence[PullItem], channel_for: Callable[[str], grpc.aio.Channel], *,
               token: str = "", epoch: int = 0, streams_per_peer: int = 2,
               max_streams: int = 16, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               use_bulk: bool = True) -> PullStats:
    """Fetch every item; raise `TransferError` with the items no holder could serve.
    `use_bulk=False` keeps every byte on `PullTensors` streams."""
    stats, reasons = PullStats(), []
    metadata = [("authorization", f"Bearer {token}")] if token else []
    pending = [i for i in items if i.holders]
    failed = [i for i in items if not i.holders]
    start = time.perf_counter()
    limit = asyncio.Semaphore(max_streams)
    grpc_only: set[str] = set()   # holders without a (reachable) bulk port

    async def fetch(peer: str, batch: list[PullItem], done: set[int]) -> int:
        stub = worker_pb2_grpc.WorkerStub(channel_for(peer))
        if use_bulk and peer not in grpc_only:
            try:
                got = await _pull_bulk(stub, _host(peer), batch, epoch, chunk_bytes,
                                       metadata, done)
                stats.bulk_bytes += got
                return got
            except (_NoBulkPort, bulk.BulkUnreachable):
                grpc_only.add(peer)
        return await _pull_batch(stub, batch, epoch, chunk_bytes, metadata, done)

    async def run(peer: str, batch: list[PullItem]) -> list[PullItem]:
        done: set[int] = set()
        async with limit:
            stats.streams += 1
            try:
                got = await fetch(peer, batch, done)
                stats.by_peer[peer] = stats.by_peer.get(peer, 0) + got
                stats.bytes += got
            except (grpc.aio.AioRpcError, _ChecksumError, bulk.BulkError) as exc:
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                reasons.append(f"{peer}: {detail}")
        return [i for i in batch if id(i) not in done]

    while pending:
        results = await asyncio.gather(*(run(p, b) for p, b in _batches(pending, streams_per_peer)))
        pending = []
        for item in (i for unfinished in results for i in unfinished):
            item.holders = item.holders[1:]
            stats.retries += 1
            (pending if item.holders else failed).append(item)
    stats.seconds = time.perf_counter() - start
    if failed:
        raise TransferError(failed, reasons)
    return stats
