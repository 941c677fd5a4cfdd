"""The bulk port: slice bytes over plain TCP, negotiated and authenticated over gRPC.

On loopback gRPC Python spends about 1.5 s of CPU per GB received and 0.7 s per GB sent,
where a socket spends 0.1 to 0.3 s, so a `PullTensors` stream moves a fraction of what a
socket does. A receiver therefore asks the holder `OpenBulkPull` (same request, same
checks, same bearer token): the holder resolves the slices and offers them under a
one-time random ticket. The receiver connects to the holder's bulk port, presents the
ticket, and the holder sends each slice's bytes followed by its CRC-32; the receiver
`recv_into`s them straight into the destination buffers and verifies each checksum.

Both ends run on threads (`sendall`, `recv_into` and the checksum release the GIL), so
the worker's event loop keeps serving while bytes flow. Wire format: see `BulkTicket` in
worker.proto."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from spotserve.worker.checksum import crc32

log = logging.getLogger(__name__)

MAGIC = b"SSB1"
TICKET_BYTES = 32
ACCEPTED, REJECTED = b"\x00", b"\x01"
CRC = struct.Struct("!I")
HELLO_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 3.0  # then the holder's port counts as unreachable: use gRPC
IDLE_TIMEOUT_S = 60.0   # no byte moving for this long fails the transfer
PIECE_BYTES = 4 << 20   # bytes per send / receive-and-checksum step


class BulkError(RuntimeError):
    """A bulk transfer failed part-way (closed, timed out, rejected or corrupt)."""


class BulkUnreachable(BulkError):
    """The holder's bulk port did not accept a connection: use gRPC instead."""


def as_bytes(view: memoryview) -> memoryview:
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


@dataclass(frozen=True)
class _Offer:
    slices: list[memoryview]
    expires: float


class BulkServer:
    """A worker's bulk port. `offer` (event-loop thread) registers slices under a ticket;
    one connection presenting it gets them. `start`/`stop` bound its life."""

    def __init__(self, *, ticket_ttl_s: float = 30.0, send_bytes_per_s: float = 0.0,
                 on_sent: Callable[[int], None] | None = None, max_connections: int = 16,
                 piece_bytes: int = PIECE_BYTES) -> None:
        self.ticket_ttl_s, self.send_bytes_per_s = ticket_ttl_s, send_bytes_per_s
        self.piece_bytes = piece_bytes
        self.on_sent = on_sent
        self.port = 0
        self.bytes_sent = 0
        self._max_connections = max_connections
        self._offers: dict[bytes, _Offer] = {}
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[socket.socket] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._listener is not None

    async def start(self, host: str, port: int = 0) -> int:
        """Listen on `host:port` (0: any free port); the port bound."""
        host = host.strip("[]")
        if host in ("", "::") and socket.has_dualstack_ipv6():   # every interface, v4 and v6
            listener = socket.create_server((host, port), family=socket.AF_INET6, backlog=64,
                                            dualstack_ipv6=True)
        else:
            listener = socket.create_server((host, port), family=_family(host), backlog=64)
        listener.setblocking(False)
        self._listener, self.port = listener, listener.getsockname()[1]
        self._pool = ThreadPoolExecutor(self._max_connections, thread_name_prefix="bulk-send")
        self._accepting = asyncio.get_running_loop().create_task(self._accept(listener))
        return self.port

    async def stop(self) -> None:
        """Close the port, end the transfers in flight, forget the tickets."""
        if self._listener is None:
            return
        assert self._accepting is not None and self._pool is not None
        self._accepting.cancel()
        self._listener.close()
        self._listener = None
        for conn in list(self._connections):
            _shutdown(conn)
        await asyncio.gather(self._accepting, *self._tasks, return_exceptions=True)
        self._pool.shutdown(wait=False)
        self._offers.clear()

    def offer(self, slices: Sequence[memoryview]) -> bytes:
        """A one-time ticket for `slices` (sent in this order), valid `ticket_ttl_s`."""
        now = time.monotonic()
        for stale in [t for t, o in self._offers.items() if o.expires < now]:
            del self._offers[stale]
        ticket = secrets.token_bytes(TICKET_BYTES)
        self._offers[ticket] = _Offer([as_bytes(s) for s in slices], now + self.ticket_ttl_s)
        return ticket

    def _claim(self, hello: bytes) -> _Offer | None:
        if len(hello) != len(MAGIC) + TICKET_BYTES or not hello.startswith(MAGIC):
            return None
        offer = self._offers.pop(hello[len(MAGIC):], None)
        return offer if offer is not None and offer.expires >= time.monotonic() else None

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = loop.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._connections.add(conn)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = await asyncio.wait_for(_read(loop, conn, len(MAGIC) + TICKET_BYTES),
                                           HELLO_TIMEOUT_S)
            offer = self._claim(hello)
            if offer is None:
                log.warning("bulk port: rejected a connection without a valid ticket")
                await loop.sock_sendall(conn, REJECTED)
                return
            _idle_timeout(conn, IDLE_TIMEOUT_S)
            assert self._pool is not None
            await loop.run_in_executor(self._pool, self._send, conn, offer)
        except (OSError, TimeoutError) as exc:
            log.info("bulk port: a transfer ended early: %s", exc)
        finally:
            self._connections.discard(conn)
            conn.close()

    def _send(self, conn: socket.socket, offer: _Offer) -> None:
        conn.sendall(ACCEPTED)
        # a rate-limited port paces itself in steps of about 50 ms
        step = self.piece_bytes if not self.send_bytes_per_s else \
            max(1 << 16, min(self.piece_bytes, int(self.send_bytes_per_s / 20)))
        for data in offer.slices:
            crc = 0
            for start in range(0, data.nbytes, step):
                piece = data[start:start + step]
                crc = crc32(piece, crc)
                conn.sendall(piece)
                self._count(len(piece))
            conn.sendall(CRC.pack(crc))

    def _count(self, sent: int) -> None:
        with self._lock:
            self.bytes_sent += sent
        if self.on_sent is not None:
            self.on_sent(sent)
        if self.send_bytes_per_s:
            time.sleep(sent / self.send_bytes_per_s)


# ---- client ----------------------------------------------------------------------------
_receivers: ThreadPoolExecutor | None = None


async def fetch(host: str, port: int, ticket: bytes, dests: Sequence[memoryview], *,
                on_slice: Callable[[int], None], piece_bytes: int = 0,
                timeout_s: float = IDLE_TIMEOUT_S) -> int:
    """Fetch every slice of `ticket` into `dests` (in order, each exactly its size),
    verify each CRC-32 and call `on_slice(i)` (from a receiving thread) once slice i is
    in; the bytes received. Raises `BulkUnreachable` when the port does not answer,
    `BulkError` on any later failure. Cancelling stops the receiving thread before this
    returns, so no byte lands in `dests` afterwards."""
    loop = asyncio.get_running_loop()
    try:
        sock = await asyncio.wait_for(_connect(host, port), min(timeout_s, CONNECT_TIMEOUT_S))
    except (OSError, TimeoutError) as exc:
        raise BulkUnreachable(f"bulk port {host}:{port}: {exc or 'timed out'}") from exc
    with sock:
        try:
            await loop.sock_sendall(sock, MAGIC + ticket)
            if await asyncio.wait_for(_read(loop, sock, 1), timeout_s) != ACCEPTED:
                raise BulkError("the holder rejected the bulk ticket")
            _idle_timeout(sock, timeout_s)
            done = asyncio.wrap_future(_receiver_pool().submit(
                _receive_all, sock, [as_bytes(d) for d in dests], on_slice,
                piece_bytes or PIECE_BYTES))
            try:
                return await asyncio.shield(done)
            except asyncio.CancelledError:
                _shutdown(sock)
                await asyncio.wait([done])
                if not done.cancelled():
                    done.exception()   # the error the shutdown caused: expected
                raise
        except (OSError, TimeoutError) as exc:
            raise BulkError(f"bulk transfer from {host}:{port} broke: {exc or 'timed out'}"
                            ) from exc


def _receiver_pool() -> ThreadPoolExecutor:
    global _receivers
    if _receivers is None:
        _receivers = ThreadPoolExecutor(32, thread_name_prefix="bulk-receive")
    return _receivers


async def _connect(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    family, kind, proto, _, address = (await loop.getaddrinfo(
        host, port, type=socket.SOCK_STREAM))[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


def _receive_all(sock: socket.socket, dests: list[memoryview],
                 on_slice: Callable[[int], None], piece_bytes: int) -> int:
    for index, dest in enumerate(dests):
        crc = 0
        for start in range(0, dest.nbytes, piece_bytes):
            piece = dest[start:start + piece_bytes]
            _fill(sock, piece)
            crc = crc32(piece, crc)
        (expected,) = CRC.unpack(_read_exactly(sock, CRC.size))
        if crc != expected:
            raise BulkError(f"slice {index}: checksum mismatch")
        on_slice(index)
    return sum(d.nbytes for d in dests)


def _fill(sock: socket.socket, piece: memoryview) -> None:
    got = 0
    while got < piece.nbytes:
        n = sock.recv_into(piece[got:])
        if n == 0:
            raise BulkError("the holder closed the bulk connection early")
        got += n


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    _fill(sock, memoryview(buffer))
    return bytes(buffer)


async def _read(loop: asyncio.AbstractEventLoop, conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = await loop.sock_recv(conn, size - len(data))
        if not more:
            break
        data += more
    return data


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _idle_timeout(sock: socket.socket, seconds: float) -> None:
    """Blocking mode, with the kernel failing a send or receive that makes no progress for
    `seconds`. Python's own timeouts poll before every partial send or receive, which
    costs 10-15 % of the throughput here."""
    sock.setblocking(True)
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _shutdown(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
