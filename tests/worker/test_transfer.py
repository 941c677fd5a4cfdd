"""Tensor streaming between workers on loopback: exact bytes, auth, errors, failover.

Peers here run no bulk port unless asked (`start(bulk=True)`), so these tests cover the
`PullTensors` path, which is also the fallback; `test_bulk` covers the bulk port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from spotserve.auth import TokenInterceptor, call_metadata
from spotserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from spotserve.worker.peer_service import TensorServicer
from spotserve.worker.tensor_store import HeldTensor, TensorStore
from spotserve.worker.transfer import CHANNEL_OPTIONS, PullItem, TransferError, pull

TOKEN = "s3cret"


class Peer:
    def __init__(self, store: TensorStore, servicer: TensorServicer | None = None) -> None:
        self.servicer = servicer or TensorServicer(store)
        self.server = grpc.aio.server(interceptors=[TokenInterceptor(TOKEN)],
                                      options=CHANNEL_OPTIONS)
        worker_pb2_grpc.add_WorkerServicer_to_server(self.servicer, self.server)
        self.address = ""

    async def start(self, bulk: bool = False) -> Peer:
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        if bulk and not self.servicer.bulk.running:
            await self.servicer.start_bulk("127.0.0.1")
        self.address = f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        await self.servicer.stop_bulk()
        await self.server.stop(0)


@pytest.fixture
def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"a": rng.standard_normal((64, 48), dtype=np.float32),
            "b": rng.standard_normal((3 << 18,), dtype=np.float32)}  # 3 MiB: several chunks


def store_of(weights: dict[str, np.ndarray]) -> TensorStore:
    store = TensorStore()
    for name, array in weights.items():
        store.put(name, HeldTensor.from_bytes("float32", array.shape, array.tobytes()))
    return store


async def _pull(addresses: list[str], wanted: list[common_pb2.TensorSlice],
                sizes: list[int], **kwargs: object) -> tuple[list[bytearray], object]:
    channels: dict[str, grpc.aio.Channel] = {}

    def channel_for(address: str) -> grpc.aio.Channel:
        if address not in channels:
            channels[address] = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return channels[address]

    dests = [bytearray(n) for n in sizes]
    items = [PullItem(memoryview(d), list(addresses), weight=w)
             for d, w in zip(dests, wanted, strict=True)]
    try:
        stats = await pull(items, channel_for, token=TOKEN, **kwargs)  # type: ignore[arg-type]
    finally:
        for ch in channels.values():
            await ch.close()
    return dests, stats


async def test_pulls_exact_slices_along_rows_and_columns(weights: dict[str, np.ndarray]) -> None:
    peer = await Peer(store_of(weights)).start()
    wanted = [common_pb2.TensorSlice(tensor="a", dim=0, start=8, stop=24),
              common_pb2.TensorSlice(tensor="a", dim=1, start=5, stop=17),
              common_pb2.TensorSlice(tensor="b", dim=-1, start=0, stop=0)]
    expect = [weights["a"][8:24], weights["a"][:, 5:17], weights["b"]]
    dests, stats = await _pull([peer.address], wanted, [e.nbytes for e in expect],
                               streams_per_peer=2, chunk_bytes=1 << 20)
    for got, want in zip(dests, expect, strict=True):
        assert np.array_equal(np.frombuffer(got, np.float32).reshape(want.shape), want)
    assert stats.bytes == sum(e.nbytes for e in expect)  # type: ignore[attr-defined]
    assert stats.bulk_bytes == 0, "no bulk port: every byte over PullTensors"  # type: ignore
    await peer.server.stop(0)


async def test_calls_without_the_token_are_rejected(weights: dict[str, np.ndarray]) -> None:
    peer = await Peer(store_of(weights)).start()
    async with grpc.aio.insecure_channel(peer.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        request = worker_pb2.PullTensorsRequest(
            weights=[common_pb2.TensorSlice(tensor="a", dim=-1)])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.PullTensors(request, metadata=call_metadata("wrong")):
                pass
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await peer.server.stop(0)


@pytest.mark.parametrize(("request_kwargs", "code", "message"), [
    ({"weights": [common_pb2.TensorSlice(tensor="nope", dim=-1)]}, grpc.StatusCode.NOT_FOUND,
     "not held"),
    ({"weights": [common_pb2.TensorSlice(tensor="a", dim=0, start=60, stop=70)]},
     grpc.StatusCode.NOT_FOUND, "outside the held"),
    ({"weights": [common_pb2.TensorSlice(tensor="a", dim=0, start=0, stop=1)],
      "chunk_bytes": 64 << 20}, grpc.StatusCode.INVALID_ARGUMENT, "chunk_bytes"),
    ({}, grpc.StatusCode.INVALID_ARGUMENT, "slices per call"),
    ({"kv": [common_pb2.KVSlice(request_id="r1")]}, grpc.StatusCode.NOT_FOUND, "no KV"),
])
@pytest.mark.parametrize("rpc", ["PullTensors", "OpenBulkPull"])
async def test_bad_requests_get_clear_errors_and_the_worker_keeps_serving(
        weights: dict[str, np.ndarray], request_kwargs: dict[str, object],
        code: grpc.StatusCode, message: str, rpc: str) -> None:
    peer = await Peer(store_of(weights)).start(bulk=True)
    async with grpc.aio.insecure_channel(peer.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        request = worker_pb2.PullTensorsRequest(**request_kwargs)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            if rpc == "OpenBulkPull":
                await stub.OpenBulkPull(request, metadata=call_metadata(TOKEN))
            async for _ in stub.PullTensors(request, metadata=call_metadata(TOKEN)):
                pass
        assert err.value.code() == code and message in (err.value.details() or "")
    dests, _ = await _pull([peer.address], [common_pb2.TensorSlice(tensor="a", dim=-1)],
                           [weights["a"].nbytes])
    assert bytes(dests[0]) == weights["a"].tobytes()
    await peer.stop()


class DyingServicer(TensorServicer):
    """Sends a few chunks, then the process 'dies' (the server stops mid-stream)."""

    def __init__(self, store: TensorStore, server_box: list[grpc.aio.Server]) -> None:
        super().__init__(store)
        self.box = server_box

    async def PullTensors(self, request: worker_pb2.PullTensorsRequest,
                          context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[worker_pb2.TensorChunk]:
        sent = 0
        async for chunk in super().PullTensors(request, context):
            yield chunk
            sent += 1
            if sent == 2:
                asyncio.get_running_loop().create_task(self.box[0].stop(0))
                await asyncio.sleep(5)


async def test_receiver_fails_over_to_the_next_holder(weights: dict[str, np.ndarray]) -> None:
    box: list[grpc.aio.Server] = []
    dying = Peer(store_of(weights), DyingServicer(store_of(weights), box))
    box.append(dying.server)
    await dying.start()
    healthy = await Peer(store_of(weights)).start()
    dests, stats = await _pull([dying.address, healthy.address],
                               [common_pb2.TensorSlice(tensor="b", dim=-1)],
                               [weights["b"].nbytes])
    assert bytes(dests[0]) == weights["b"].tobytes()
    assert stats.retries == 1 and healthy.address in stats.by_peer  # type: ignore[attr-defined]
    await healthy.server.stop(0)


async def test_no_holder_left_raises_with_the_missing_slices(
        weights: dict[str, np.ndarray]) -> None:
    peer = await Peer(store_of(weights)).start()
    await peer.server.stop(0)
    with pytest.raises(TransferError, match="no holder could serve b"):
        await _pull([peer.address], [common_pb2.TensorSlice(tensor="b", dim=-1)],
                    [weights["b"].nbytes])


async def test_checksum_mismatch_is_detected(weights: dict[str, np.ndarray]) -> None:
    class Corrupt(TensorServicer):
        async def PullTensors(self, request: worker_pb2.PullTensorsRequest,
                              context: grpc.aio.ServicerContext
                              ) -> AsyncIterator[worker_pb2.TensorChunk]:
            async for chunk in super().PullTensors(request, context):
                if chunk.offset == 0:
                    chunk.data = b"\xff" + chunk.data[1:]
                yield chunk

    bad = await Peer(store_of(weights), Corrupt(store_of(weights))).start()
    good = await Peer(store_of(weights)).start()
    dests, stats = await _pull([bad.address, good.address],
                               [common_pb2.TensorSlice(tensor="a", dim=-1)],
                               [weights["a"].nbytes])
    assert bytes(dests[0]) == weights["a"].tobytes() and stats.retries == 1  # type: ignore
    await bad.server.stop(0)
    await good.server.stop(0)
