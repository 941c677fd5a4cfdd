"""Process groups of one configuration epoch and the collectives the model calls.

A worker process belongs to one world (`torch.distributed` default group, created once);
each configuration epoch builds, over that world, one TP group per stage and one group per
pipeline, and tears them down when the next epoch begins, so the same processes can be
regrouped after a migration. Backend: NCCL on CUDA, gloo on CPU.

Hidden states move stage to stage by point-to-point: rank 0 of a stage's TP group sends to
every rank of the next stage. The pipeline driver (stage 0, TP rank 0) broadcasts each
step's metadata over the pipeline's control group; the last stage's TP rank 0 samples and
broadcasts the tokens back. The control group is always gloo (CPU), also when tensors
travel over NCCL, so commands and failure detection behave the same on every device.

Failure detection: every group is created with `peer_timeout`, so no collective waits
longer than that for a peer that died or stopped answering (gloo enforces it per
operation; NCCL's watchdog aborts the communicator after it). A healthy idle pipeline never
hits the timeout: its driver pings every rank well within it (`ping`). `abort` tears the
communicators down at once when the worker knows the pipeline is broken.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from spotserve.errors import SpotserveError
from spotserve.layout import ParallelConfig, Position

DEFAULT_PEER_TIMEOUT = 5.0  # seconds a collective waits for a peer before the pipeline fails


@dataclass
class TensorParallel:
    """The collectives of one stage's TP group (identity when the degree is 1)."""

    size: int = 1
    rank: int = 0
    group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate each rank's `x` along the last dim; rank i holds `sizes[i]` columns
        (uneven sizes are padded for the collective and trimmed after)."""
        if self.size == 1:
            return x
        width = max(sizes)
        padded = torch.nn.functional.pad(x, (0, width - x.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes, strict=True)], dim=-1)


@dataclass
class EpochGroups:
    """Everything one process needs to talk to its peers during one configuration epoch.

    `position` is None for a process the epoch does not use (it only takes part in
    building the groups)."""

    epoch: int
    config: ParallelConfig
    position: Position | None
    ranks: dict[Position, int]
    tp: TensorParallel = field(default_factory=TensorParallel)
    pipeline_group: Any = None
    control_group: Any = None   # gloo: commands, sampled tokens, pings
    _owned: list[Any] = field(default_factory=list)

    # ---- construction -----------------------------------------------------------------
    @classmethod
    def single(cls, config: ParallelConfig) -> EpochGroups:
        """One process holding the whole model (no torch.distributed needed)."""
        pos = Position(0, 0, 0)
        if config.num_gpus != 1:
            raise SpotserveError(f"a single process cannot run {config.describe()}")
        return cls(0, config, pos, {pos: 0})

    @classmethod
    def create(cls, epoch: int, config: ParallelConfig, ranks: Mapping[Position, int],
               peer_timeout: float = DEFAULT_PEER_TIMEOUT) -> EpochGroups:
        """Collective over the whole world: every process calls it with the same arguments.
        `ranks` maps each position of `config` to a global rank; no collective of these
        groups waits more than `peer_timeout` seconds for a peer."""
        if set(ranks) != set(config.positions()):
            raise SpotserveError("ranks must map every position of the configuration")
        me = dist.get_rank()
        mine = [p for p, r in ranks.items() if r == me]
        groups = cls(epoch, config, mine[0] if mine else None, dict(ranks))
        timeout = timedelta(seconds=peer_timeout)
        for d, pipe in enumerate(config.pipelines):
            for s, stage in enumerate(pipe.stages):
                members = [ranks[Position(d, s, t)] for t in range(stage.tp)]
                group = groups._new_group(members, timeout) if stage.tp > 1 else None
                if groups.position and (groups.position.pipeline, groups.position.stage) == (d, s):
                    groups.tp = TensorParallel(stage.tp, groups.position.tp_rank, group)
            members = [ranks[p] for p in config.positions() if p.pipeline == d]
            group = groups._new_group(members, timeout)
            control = group if dist.get_backend() == "gloo" else \
                groups._new_group(members, timeout, backend="gloo")
            if groups.position and groups.position.pipeline == d:
                groups.pipeline_group, groups.control_group = group, control
        return groups

    def _new_group(self, members: list[int], timeout: timedelta,
                   backend: str | None = None) -> Any:
        group = dist.new_group(sorted(members), timeout=timeout, backend=backend)
        self._owned.append(group)
        return group

    def destroy(self) -> None:
        """Tear this epoch's groups down (the world stays)."""
        for group in self._owned:
            if group not in (None, dist.GroupMember.NON_GROUP_MEMBER):
                dist.destroy_process_group(group)
        self._owned.clear()

    def abort(self) -> None:
        """The pipeline is broken: abort its communicators now, so that no thread stays
        blocked in a collective with a dead peer (NCCL; a gloo operation already ends at
        its timeout). Best effort: the process may be half torn down."""
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        for group in self._owned:
            if group in (None, dist.GroupMember.NON_GROUP_MEMBER) or abort is None:
                continue
            try:
                if dist.get_backend(group) != "gloo":
                    abort(group)
            except Exception:  # already destroyed, or a torch without abort support
                continue

    # ---- roles ----------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return len(self.ranks) > 1

    @property
    def stage(self) -> int:
        assert self.position is not None
        return self.position.stage

    @property
    def num_stages(self) -> int:
        assert self.position is not None
        return len(self.config.pipelines[self.position.pipeline].stages)

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def is_driver(self) -> bool:
        assert self.position is not None
        return self.position.stage == 0 and self.position.tp_rank == 0

    @property
    def is_sampler(self) -> bool:
        assert self.position is not None
        return self.is_last_stage and self.position.tp_rank == 0

    def _rank(self, stage: int, tp_rank: int = 0) -> int:
        assert self.position is not None
        return self.ranks[Position(self.position.pipeline, stage, tp_rank)]

    @property
    def driver_rank(self) -> int:
        return self._rank(0)

    @property
    def sampler_rank(self) -> int:
        return self._rank(self.num_stages - 1)

    # ---- pipeline traffic -----------------------------------------------------------
    def send_forward(self, hidden: torch.Tensor) -> None:
        """Hand hidden states to every rank of the next stage (TP rank 0 sends)."""
        assert self.position is not None
        if self.is_last_stage or self.position.tp_rank:
            return
        pipe = self.config.pipelines[self.position.pipeline]
        hidden = hidden.contiguous()
        for t in range(pipe.stages[self.stage + 1].tp):
            dist.send(hidden, dst=self._rank(self.stage + 1, t), group=self.pipeline_group)

    def recv_forward(self, shape: tuple[int, ...], dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
        hidden = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(hidden, src=self._rank(self.stage - 1), group=self.pipeline_group)
        return hidden

    def broadcast_object(self, obj: Any, src: int) -> Any:
        """Send a picklable object from global rank `src` to the whole pipeline."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.control_group)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Collect one object from every rank of the pipeline on the driver."""
        if not self.distributed:
            return [obj]
        me = dist.get_rank()
        out: list[Any] | None = None
        if me == self.driver_rank:
            out = [None] * dist.get_world_size(self.control_group)
        dist.gather_object(obj, out, dst=self.driver_rank, group=self.control_group)
        return out

    def min_int(self, value: int) -> int:
        """The smallest of every rank's `value` in the pipeline (collective)."""
        if not self.distributed:
            return value
        box = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(box, op=dist.ReduceOp.MIN, group=self.control_group)
        return int(box.item())

    def barrier(self) -> None:
        """A round trip with every rank of the pipeline (raises when one is gone)."""
        if self.distributed:
            dist.all_reduce(torch.zeros(1), group=self.control_group)


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"
