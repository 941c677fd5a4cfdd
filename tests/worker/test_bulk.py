"""The bulk port: slices over plain TCP behind a gRPC-issued one-time ticket. Exact bytes,
tickets (wrong, reused, expired, missing token), fallback to `PullTensors` when a holder
has no reachable port, failover when a source stops or is SIGKILLed mid-transfer, and
cancellation."""

from __future__ import annotations

import asyncio
import secrets
import signal
import socket
import sys
import textwrap
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest

from spotserve.auth import call_metadata
from spotserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from spotserve.worker import bulk, checksum
from spotserve.worker.transfer import PullItem, pull
from tests.worker.test_transfer import TOKEN, Peer, _pull, store_of

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"a": rng.standard_normal((64, 48), dtype=np.float32),
            "b": rng.standard_normal((3 << 18,), dtype=np.float32),   # 3 MiB
            "empty": np.zeros((0,), dtype=np.float32)}


def _slice(name: str) -> common_pb2.TensorSlice:
    return common_pb2.TensorSlice(tensor=name, dim=-1)


async def _ticket(peer: Peer, *names: str) -> worker_pb2.BulkTicket:
    async with grpc.aio.insecure_channel(peer.address) as channel:
        request = worker_pb2.PullTensorsRequest(weights=[_slice(n) for n in names])
        reply: worker_pb2.BulkTicket = await worker_pb2_grpc.WorkerStub(channel).OpenBulkPull(
            request, metadata=call_metadata(TOKEN))
        return reply


def _raw_hello(port: int, hello: bytes) -> bytes:
    """What the bulk port answers to `hello`, up to its closing the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(hello)
        answer = b""
        while more := sock.recv(1 << 16):
            answer += more
        return answer


async def test_bulk_pull_moves_exact_slices(weights: dict[str, np.ndarray]) -> None:
    peer = await Peer(store_of(weights)).start(bulk=True)
    wanted = [common_pb2.TensorSlice(tensor="a", dim=0, start=8, stop=24),
              common_pb2.TensorSlice(tensor="a", dim=1, start=5, stop=17),
              _slice("b"), _slice("empty")]
    expect = [weights["a"][8:24], weights["a"][:, 5:17], weights["b"], weights["empty"]]
    dests, stats = await _pull([peer.address], wanted, [e.nbytes for e in expect],
                               streams_per_peer=2)
    for got, want in zip(dests, expect, strict=True):
        assert np.array_equal(np.frombuffer(got, np.float32).reshape(want.shape), want)
    assert stats.bulk_bytes == stats.bytes == sum(e.nbytes for e in expect)  # type: ignore
    assert peer.servicer.bulk.bytes_sent == stats.bytes  # type: ignore[attr-defined]
    await peer.stop()


async def test_open_bulk_pull_needs_the_token(weights: dict[str, np.ndarray]) -> None:
    peer = await Peer(store_of(weights)).start(bulk=True)
    async with grpc.aio.insecure_channel(peer.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await worker_pb2_grpc.WorkerStub(channel).OpenBulkPull(
                worker_pb2.PullTensorsRequest(weights=[_slice("a")]),
                metadata=call_metadata("wrong"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await peer.stop()


async def test_the_port_rejects_wrong_reused_and_expired_tickets(
        weights: dict[str, np.ndarray]) -> None:
    peer = await Peer(store_of(weights)).start(bulk=True)
    port = peer.servicer.bulk.port
    # not a ticket at all, and a well-formed one never issued
    assert await asyncio.to_thread(_raw_hello, port, b"GET / HTTP/1.1\r\n\r\n" + b" " * 18) \
        == bulk.REJECTED
    wrong = bulk.MAGIC + secrets.token_bytes(bulk.TICKET_BYTES)
    assert await asyncio.to_thread(_raw_hello, port, wrong) == bulk.REJECTED
    # a real ticket serves its slice once, with the CRC-32 after the bytes
    ticket = await _ticket(peer, "a")
    answer = await asyncio.to_thread(_raw_hello, port, bulk.MAGIC + ticket.ticket)
    data = weights["a"].tobytes()
    assert answer == bulk.ACCEPTED + data + bulk.CRC.pack(zlib.crc32(data))
    assert await asyncio.to_thread(_raw_hello, port, bulk.MAGIC + ticket.ticket) \
        == bulk.REJECTED
    # and only within its time to live
    peer.servicer.bulk.ticket_ttl_s = 0.05
    ticket = await _ticket(peer, "a")
    await asyncio.sleep(0.1)
    with pytest.raises(bulk.BulkError, match="rejected"):
        await bulk.fetch("127.0.0.1", port, ticket.ticket, [memoryview(bytearray(data))],
                         on_slice=lambda _: None)
    await peer.stop()


async def test_a_holder_without_a_reachable_port_streams_over_grpc(
        weights: dict[str, np.ndarray]) -> None:
    closed = await Peer(store_of(weights)).start(bulk=True)
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed.servicer.bulk.port = s.getsockname()[1]
    none = await Peer(store_of(weights)).start(bulk=False)
    for peer in (closed, none):
        dests, stats = await _pull([peer.address], [_slice("b")], [weights["b"].nbytes])
        assert bytes(dests[0]) == weights["b"].tobytes()
        assert stats.bulk_bytes == 0 and stats.retries == 0  # type: ignore[attr-defined]
        await peer.stop()


async def test_a_source_stopping_mid_transfer_fails_over(
        weights: dict[str, np.ndarray]) -> None:
    slow = await Peer(store_of(weights)).start()
    await slow.servicer.start_bulk("127.0.0.1", send_bytes_per_s=4e6)  # 3 MiB: ~0.8 s
    healthy = await Peer(store_of(weights)).start(bulk=True)

    async def stop_when_half_sent() -> None:
        while slow.servicer.bulk.bytes_sent < 1 << 20:
            await asyncio.sleep(0.01)
        await slow.stop()

    (dests, stats), _ = await asyncio.gather(
        _pull([slow.address, healthy.address], [_slice("b")], [weights["b"].nbytes]),
        stop_when_half_sent())
    assert bytes(dests[0]) == weights["b"].tobytes()
    assert stats.retries == 1 and healthy.address in stats.by_peer  # type: ignore[attr-defined]
    await healthy.stop()


async def test_a_corrupt_bulk_stream_is_caught_and_refetched(
        weights: dict[str, np.ndarray]) -> None:
    class Corrupting(bulk.BulkServer):
        def _send(self, conn: socket.socket, offer: bulk._Offer) -> None:
            conn.sendall(bulk.ACCEPTED)
            for data in offer.slices:
                bad = bytearray(data)
                bad[-1] ^= 0xFF
                conn.sendall(bad + bulk.CRC.pack(zlib.crc32(data)))

    bad = await Peer(store_of(weights)).start()
    bad.servicer.bulk = Corrupting()
    await bad.servicer.bulk.start("127.0.0.1")
    good = await Peer(store_of(weights)).start(bulk=True)
    dests, stats = await _pull([bad.address, good.address], [_slice("a"), _slice("b")],
                               [weights["a"].nbytes, weights["b"].nbytes], streams_per_peer=1)
    assert bytes(dests[0]) + bytes(dests[1]) == weights["a"].tobytes() + weights["b"].tobytes()
    assert stats.retries == 2 and set(stats.by_peer) == {good.address}  # type: ignore
    await bad.stop()
    await good.stop()


async def test_cancelling_a_pull_stops_writing_into_the_destination(
        weights: dict[str, np.ndarray]) -> None:
    slow = await Peer(store_of(weights)).start()
    await slow.servicer.start_bulk("127.0.0.1", send_bytes_per_s=2e6)
    channel = grpc.aio.insecure_channel(slow.address)
    dest = bytearray(weights["b"].nbytes)
    task = asyncio.create_task(pull([PullItem(memoryview(dest), [slow.address],
                                              weight=_slice("b"))],
                                    lambda _: channel, token=TOKEN))
    while slow.servicer.bulk.bytes_sent == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    snapshot = bytes(dest)
    await asyncio.sleep(0.5)
    assert bytes(dest) == snapshot and snapshot != weights["b"].tobytes()
    await channel.close()
    await slow.stop()


async def test_a_holder_that_stalls_fails_the_transfer_after_the_idle_timeout() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    stalled: list[socket.socket] = []

    def accept_and_stall() -> None:
        conn, _ = listener.accept()
        conn.recv(len(bulk.MAGIC) + bulk.TICKET_BYTES, socket.MSG_WAITALL)
        conn.sendall(bulk.ACCEPTED + b"\x00" * 1000)   # then nothing more
        stalled.append(conn)

    server = asyncio.create_task(asyncio.to_thread(accept_and_stall))
    with pytest.raises(bulk.BulkError, match="broke"):
        await bulk.fetch("127.0.0.1", listener.getsockname()[1], bytes(bulk.TICKET_BYTES),
                         [memoryview(bytearray(1 << 20))], on_slice=lambda _: None,
                         timeout_s=0.3)
    await server
    for conn in (*stalled, listener):
        conn.close()


HOLDER = textwrap.dedent("""
    import asyncio, sys
    import grpc, numpy as np
    from spotserve.auth import TokenInterceptor
    from spotserve.v1 import worker_pb2_grpc
    from spotserve.worker.peer_service import TensorServicer
    from spotserve.worker.tensor_store import HeldTensor, TensorStore
    from spotserve.worker.transfer import CHANNEL_OPTIONS

    async def main():
        data = np.random.default_rng(7).integers(0, 255, 8 << 20, dtype=np.uint8)
        store = TensorStore()
        store.put("big", HeldTensor.from_bytes("float32", (data.size // 4,), data))
        server = grpc.aio.server(interceptors=[TokenInterceptor(sys.argv[1])],
                                 options=CHANNEL_OPTIONS)
        servicer = TensorServicer(store)
        worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await servicer.start_bulk("127.0.0.1", send_bytes_per_s=float(sys.argv[2]))
        print(port, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
""")


async def _holder(rate: float) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, TOKEN, str(rate), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    port = int(await asyncio.wait_for(process.stdout.readline(), 60))
    return process, f"127.0.0.1:{port}"


async def test_sigkill_of_a_bulk_source_mid_transfer_fails_over_to_the_next_holder() -> None:
    (victim, doomed), (survivor, healthy) = await asyncio.gather(_holder(8e6), _holder(0))
    expect = np.random.default_rng(7).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes()
    channels: dict[str, grpc.aio.Channel] = {}
    dest = bytearray(len(expect))
    item = PullItem(memoryview(dest), [doomed, healthy], weight=_slice("big"))
    try:
        pulling = asyncio.create_task(pull(
            [item], lambda a: channels.setdefault(a, grpc.aio.insecure_channel(a)),
            token=TOKEN))
        while not any(dest[:1 << 20]):   # the doomed holder has started sending
            await asyncio.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        stats = await asyncio.wait_for(pulling, 60)
        assert bytes(dest) == expect
        assert stats.retries == 1 and stats.by_peer == {healthy: len(expect)}
        assert stats.bulk_bytes == len(expect)
    finally:
        for process in (victim, survivor):
            if process.returncode is None:
                process.kill()
            await process.wait()
        for channel in channels.values():
            await channel.close()


def test_the_checksum_is_zlibs_crc32_whichever_library_computes_it() -> None:
    data = np.random.default_rng(3).integers(0, 255, (1 << 20) + 7, dtype=np.uint8).tobytes()
    assert checksum.crc32(data) == zlib.crc32(data)
    assert checksum.crc32(data[1000:], checksum.crc32(data[:1000])) == zlib.crc32(data)
