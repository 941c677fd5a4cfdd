"""Benchmark: weight streaming between two worker processes on loopback vs raw TCP.

A holder process keeps N tensors (1 GiB in all by default) in a `TensorStore` and serves
them over the Worker service's `PullTensors`; it also serves the same bytes over plain TCP
sockets. The puller, in this process, fetches everything into preallocated buffers with
1, 2 and 4 parallel streams each way and reports GB/s and the gRPC/TCP ratio.

Then (`bench/transfer/resume.py`) the time from `Drain` to the resumed first token when a
(P=1, M=2) pipeline of real worker processes hands its requests to a third worker.

    python bench/transfer/run.py [--gib 1] [--streams 1,2,4] [--out bench/results]
    python bench/transfer/run.py --parts resume      # only the drain-to-resume case
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import struct
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from spotserve.auth import TokenInterceptor
from spotserve.v1 import common_pb2, worker_pb2_grpc
from spotserve.worker.peer_service import TensorServicer
from spotserve.worker.tensor_store import HeldTensor, TensorStore
from spotserve.worker.transfer import CHANNEL_OPTIONS, PullItem, pull

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resume import add_resume_arguments, run_resume

TENSOR_BYTES = 16 << 20  # one tensor = 16 MiB, a typical projection slice of a 7-8B model
TOKEN = "bench"


def _holder(total: int, ready: mp.Queue) -> None:  # type: ignore[type-arg]
    count = total // TENSOR_BYTES
    data = np.random.default_rng(0).integers(0, 255, total, dtype=np.uint8)
    store = TensorStore()
    for i in range(count):
        part = data[i * TENSOR_BYTES:(i + 1) * TENSOR_BYTES]
        store.put(f"t{i}", HeldTensor.from_bytes("float32", (TENSOR_BYTES // 4,), part))

    async def main() -> None:
        server = grpc.aio.server(interceptors=[TokenInterceptor(TOKEN)], options=CHANNEL_OPTIONS)
        worker_pb2_grpc.add_WorkerServicer_to_server(TensorServicer(store), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()

        async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            first, n = struct.unpack("!QQ", await reader.readexactly(16))
            for i in range(first, first + n):
                writer.write(memoryview(data[i * TENSOR_BYTES:(i + 1) * TENSOR_BYTES]))
                await writer.drain()
            writer.close()

        tcp = await asyncio.start_server(send, "127.0.0.1", 0)
        ready.put((port, tcp.sockets[0].getsockname()[1]))
        await asyncio.Event().wait()

    asyncio.run(main())


def _tcp_pull(port: int, count: int, streams: int, dest: bytearray) -> float:
    """Raw TCP: `streams` connections, each receiving a contiguous run of tensors."""
    import threading

    view = memoryview(dest)
    per = [count // streams + (1 if s < count % streams else 0) for s in range(streams)]
    starts = [sum(per[:s]) for s in range(streams)]

    def one(first: int, n: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(struct.pack("!QQ", first, n))
            pos, end = first * TENSOR_BYTES, (first + n) * TENSOR_BYTES
            while pos < end:
                got = sock.recv_into(view[pos:end])
                if not got:
                    raise RuntimeError("holder closed early")
                pos += got

    threads = [threading.Thread(target=one, args=(s0, n)) for s0, n in zip(starts, per,
                                                                            strict=True)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


async def _grpc_pull(port: int, count: int, streams: int, dest: bytearray) -> float:
    address = f"127.0.0.1:{port}"
    channels = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
                for _ in range(streams)]
    view = memoryview(dest)
    # one channel (TCP connection) per stream, as separate peers would have
    items = [PullItem(view[i * TENSOR_BYTES:(i + 1) * TENSOR_BYTES], [f"{address}#{i % streams}"],
                      weight=common_pb2.TensorSlice(tensor=f"t{i}", dim=-1))
             for i in range(count)]
    stats = await pull(items, lambda a: channels[int(a.split("#")[1])], token=TOKEN,
                       streams_per_peer=1)
    for ch in channels:
        await ch.close()
    return stats.seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="bytes to move (default 1 GiB)")
    parser.add_argument("--streams", default="1,2,4", help="parallel stream counts")
    parser.add_argument("--repeat", type=int, default=2, help="runs per case; best is kept")
    parser.add_argument("--out", default="bench/results", help="folder for transfer.json")
    parser.add_argument("--parts", default="transfer,resume",
                        help="transfer (gRPC vs TCP), resume (drain to resumed first token)")
    add_resume_arguments(parser)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    result: dict[str, object] = {}
    if "transfer" in parts:
        result.update(_transfer(args))
    if "resume" in parts:
        result["drain_resume"] = run_resume(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'transfer.json'}")
    return 0


def _transfer(args: argparse.Namespace) -> dict[str, object]:
    total = int(args.gib * (1 << 30)) // TENSOR_BYTES * TENSOR_BYTES
    count = total // TENSOR_BYTES
    ready: mp.Queue = mp.get_context("spawn").Queue()  # type: ignore[type-arg]
    holder = mp.get_context("spawn").Process(target=_holder, args=(total, ready), daemon=True)
    holder.start()
    grpc_port, tcp_port = ready.get(timeout=120)
    dest = bytearray(total)
    rows = []
    print(f"moving {total / 2**30:.2f} GiB on loopback, {count} tensors of "
          f"{TENSOR_BYTES >> 20} MiB, best of {args.repeat}")
    print(f"{'streams':>7} {'gRPC GB/s':>10} {'TCP GB/s':>9} {'ratio':>6}")
    for streams in (int(s) for s in args.streams.split(",")):
        g = min(asyncio.run(_grpc_pull(grpc_port, count, streams, dest))
                for _ in range(args.repeat))
        t = min(_tcp_pull(tcp_port, count, streams, dest) for _ in range(args.repeat))
        row = {"streams": streams, "grpc_gbps": total / g / 1e9, "tcp_gbps": total / t / 1e9}
        row["ratio"] = row["grpc_gbps"] / row["tcp_gbps"]
        rows.append(row)
        print(f"{streams:>7} {row['grpc_gbps']:>10.2f} {row['tcp_gbps']:>9.2f} "
              f"{row['ratio']:>6.2f}")
    holder.terminate()
    return {"bytes": total, "rows": rows}


if __name__ == "__main__":
    sys.exit(main())
