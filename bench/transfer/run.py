"""Benchmark: weight streaming between two worker processes on loopback vs raw TCP.

A holder process keeps N tensors (1 GiB in all by default) in a `TensorStore` and serves
them as a worker does: `PullTensors` over gRPC and its bulk port (`worker/bulk.py`); it
also serves the same bytes over plain TCP, one thread per connection calling `sendall`.
The puller, in this process, fetches everything into preallocated buffers with 1, 2 and 4
parallel streams, each over its own connection, three ways:

- `pull`: `transfer.pull` as workers call it (bulk port, CRC-32 checked, gRPC fallback;
  the checksum is zlib-ng's when installed, see `worker/checksum.py`);
- `grpc`: `transfer.pull(use_bulk=False)`, every byte in `PullTensors` messages;
- `tcp`: raw sockets, `recv_into` the destination on one thread per connection, no
  checksum: the ceiling on this machine.

Cases are interleaved and the best of `--repeat` runs is kept, since the 2-core machines
this runs on are shared; the load average and each side's CPU seconds per GB are kept
with the figures. Then (`bench/transfer/resume.py`) the time from `Drain` to the resumed
first token when a (P=1, M=2) pipeline of real worker processes hands its requests to a
third worker.

    python bench/transfer/run.py [--gib 1] [--streams 1,2,4] [--out bench/results]
    python bench/transfer/run.py --parts resume      # only the drain-to-resume case
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import grpc
import numpy as np

from spotserve.auth import TokenInterceptor
from spotserve.v1 import common_pb2, worker_pb2_grpc
from spotserve.worker import checksum
from spotserve.worker.peer_service import TensorServicer
from spotserve.worker.tensor_store import HeldTensor, TensorStore
from spotserve.worker.transfer import CHANNEL_OPTIONS, PullItem, pull

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resume import add_resume_arguments, run_resume

TENSOR_BYTES = 16 << 20  # one tensor = 16 MiB, a typical projection slice of a 7-8B model
TOKEN = "bench"
CASES = ("pull", "grpc", "tcp")


def _holder(total: int, ready: mp.Queue) -> None:  # type: ignore[type-arg]
    count = total // TENSOR_BYTES
    data = np.random.default_rng(0).integers(0, 255, total, dtype=np.uint8)
    store = TensorStore()
    for i in range(count):
        part = data[i * TENSOR_BYTES:(i + 1) * TENSOR_BYTES]
        store.put(f"t{i}", HeldTensor.from_bytes("float32", (TENSOR_BYTES // 4,), part))
    tcp = _serve_tcp(memoryview(data))

    async def main() -> None:
        server = grpc.aio.server(interceptors=[TokenInterceptor(TOKEN)], options=CHANNEL_OPTIONS)
        servicer = TensorServicer(store)
        worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await servicer.start_bulk("127.0.0.1")
        ready.put((port, tcp))
        await asyncio.Event().wait()

    asyncio.run(main())


def _serve_tcp(data: memoryview) -> int:
    """Raw TCP holder: each connection asks (first tensor, count) and gets their bytes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def send(conn: socket.socket) -> None:
        with conn:
            first, n = struct.unpack("!QQ", conn.recv(16, socket.MSG_WAITALL))
            conn.sendall(data[first * TENSOR_BYTES:(first + n) * TENSOR_BYTES])

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=send, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return int(listener.getsockname()[1])


def _runs(count: int, streams: int) -> list[tuple[int, int]]:
    """(first tensor, count) of each stream: contiguous runs of about equal size."""
    per = [count // streams + (1 if s < count % streams else 0) for s in range(streams)]
    return [(sum(per[:s]), per[s]) for s in range(streams)]


def _tcp_pull(port: int, count: int, streams: int, dest: bytearray) -> float:
    """Raw TCP: `streams` connections, each `recv_into` its run of the destination."""
    view = memoryview(dest)

    def one(first: int, n: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(struct.pack("!QQ", first, n))
            pos, end = first * TENSOR_BYTES, (first + n) * TENSOR_BYTES
            while pos < end:
                got = sock.recv_into(view[pos:end])
                if not got:
                    raise RuntimeError("holder closed early")
                pos += got

    threads = [threading.Thread(target=one, args=run) for run in _runs(count, streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


async def _worker_pull(port: int, count: int, streams: int, dest: bytearray,
                       use_bulk: bool) -> float:
    address = f"127.0.0.1:{port}"
    channels = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
                for _ in range(streams)]
    view = memoryview(dest)
    # one channel (TCP connection) per stream, as separate peers would have
    items = [PullItem(view[i * TENSOR_BYTES:(i + 1) * TENSOR_BYTES], [f"{address}#{s}"],
                      weight=common_pb2.TensorSlice(tensor=f"t{i}", dim=-1))
             for s, (first, n) in enumerate(_runs(count, streams))
             for i in range(first, first + n)]
    stats = await pull(items, lambda a: channels[int(a.split("#")[1])], token=TOKEN,
                       streams_per_peer=1, use_bulk=use_bulk)
    assert stats.bulk_bytes == (stats.bytes if use_bulk else 0), "bulk port not used"
    for ch in channels:
        await ch.close()
    return stats.seconds


def _sync_pull(port: int, count: int, streams: int, dest: bytearray, use_bulk: bool) -> float:
    return asyncio.run(_worker_pull(port, count, streams, dest, use_bulk))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(run: Callable[[], float], holder: int, total: int) -> tuple[float, float, float]:
    """GB/s, and the puller's and holder's CPU seconds per GB, of one run."""
    cpu, held = time.process_time(), _cpu_seconds(holder)
    seconds = run()
    gb = total / 1e9
    return gb / seconds, (time.process_time() - cpu) / gb, (_cpu_seconds(holder) - held) / gb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="bytes to move (default 1 GiB)")
    parser.add_argument("--streams", default="1,2,4", help="parallel stream counts")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; best is kept")
    parser.add_argument("--out", default="bench/results", help="folder for transfer.json")
    parser.add_argument("--parts", default="transfer,resume",
                        help="transfer (gRPC vs TCP), resume (drain to resumed first token)")
    add_resume_arguments(parser)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    out = Path(args.out) / "transfer.json"
    # a run of some parts keeps the figures of the others
    result: dict[str, object] = json.loads(out.read_text()) if out.exists() else {}
    if "transfer" in parts:
        result.update(_transfer(args))
    if "resume" in parts:
        result["drain_resume"] = run_resume(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


def _transfer(args: argparse.Namespace) -> dict[str, object]:
    total = int(args.gib * (1 << 30)) // TENSOR_BYTES * TENSOR_BYTES
    count = total // TENSOR_BYTES
    ready: mp.Queue = mp.get_context("spawn").Queue()  # type: ignore[type-arg]
    holder = mp.get_context("spawn").Process(target=_holder, args=(total, ready), daemon=True)
    holder.start()
    grpc_port, tcp_port = ready.get(timeout=120)
    dest = bytearray(total)
    load_before = os.getloadavg()
    print(f"moving {total / 2**30:.2f} GiB on loopback, {count} tensors of "
          f"{TENSOR_BYTES >> 20} MiB, best of {args.repeat}, CRC-32 by {checksum.IMPLEMENTATION}; "
          f"load average {load_before[0]:.2f}")
    print(f"{'streams':>7} {'pull GB/s':>10} {'gRPC GB/s':>10} {'TCP GB/s':>9} {'ratio':>6} "
          f"{'gRPC ratio':>10}")
    rows = []
    for streams in (int(s) for s in args.streams.split(",")):
        best: dict[str, tuple[float, float, float]] = {}
        for _ in range(args.repeat):
            for case in CASES:
                run = partial(_tcp_pull, tcp_port, count, streams, dest) if case == "tcp" else \
                    partial(_sync_pull, grpc_port, count, streams, dest, case == "pull")
                got = _measure(run, holder.pid or 0, total)
                best[case] = max(best.get(case, got), got)
        row: dict[str, float] = {"streams": streams}
        for case in CASES:
            gbps, pull_cpu, hold_cpu = best[case]
            row.update({f"{case}_gbps": gbps, f"{case}_puller_cpu_s_per_gb": pull_cpu,
                        f"{case}_holder_cpu_s_per_gb": hold_cpu})
        row["ratio"] = row["pull_gbps"] / row["tcp_gbps"]
        row["grpc_ratio"] = row["grpc_gbps"] / row["tcp_gbps"]
        rows.append(row)
        print(f"{streams:>7} {row['pull_gbps']:>10.2f} {row['grpc_gbps']:>10.2f} "
              f"{row['tcp_gbps']:>9.2f} {row['ratio']:>6.2f} {row['grpc_ratio']:>10.2f}")
    holder.terminate()
    return {"bytes": total, "cpus": os.cpu_count(), "crc32": checksum.IMPLEMENTATION,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(), "rows": rows}


if __name__ == "__main__":
    sys.exit(main())
