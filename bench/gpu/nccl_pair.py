"""Two NCCL ranks on one node (started by torch.distributed.run): an all-reduce of 256 MiB,
its bus bandwidth printed by rank 0."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    data = torch.ones(64 << 20, device="cuda")   # 256 MiB of fp32
    for _ in range(3):
        dist.all_reduce(data)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dist.all_reduce(data)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    if rank == 0:
        size = data.numel() * data.element_size()
        print(f"all-reduce 256 MiB on 2 ranks: {seconds * 1e3:.2f} ms, "
              f"bus bandwidth {size / seconds / 1e9:.1f} GB/s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
