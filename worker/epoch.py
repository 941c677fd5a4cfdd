"""One worker's role in a configuration epoch, read from a `Configure` call, and the
torch.distributed world of its pipeline.

Each pipeline of an epoch is its own torch.distributed world (rendezvous through a TCP
store hosted by rank 0, keys prefixed by the epoch's `group_id`), so pipelines regroup
independently and a pipeline the controller leaves alone is never touched. Inside that
world the pipeline is "pipeline 0" of a one-pipeline `ParallelConfig`; rank r is the r-th
position counting stage by stage, TP rank within the stage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from spotserve.errors import SpotserveError
from spotserve.layout import ParallelConfig, PipelineLayout, Position, StageLayout
from spotserve.model_spec import ModelSpec
from spotserve.v1 import worker_pb2


@dataclass(frozen=True)
class EpochRole:
    """Where this worker sits in its pipeline for one epoch."""

    epoch: int
    config: ParallelConfig        # the pipeline alone, as pipeline 0
    position: Position            # pipeline index 0; stage and TP rank are real
    pipeline_id: str
    master_address: str           # "" for a one-GPU pipeline
    group_id: str

    @property
    def world_size(self) -> int:
        return self.config.num_gpus

    @property
    def rank(self) -> int:
        return self.ranks()[self.position]

    @property
    def is_driver(self) -> bool:
        return self.position.stage == 0 and self.position.tp_rank == 0

    def ranks(self) -> dict[Position, int]:
        return {p: i for i, p in enumerate(self.config.positions())}


def role_key(request: worker_pb2.ConfigureRequest) -> bytes:
    """What must match for a worker to keep serving untouched (the fast path): the same
    model, role and process group."""
    return b"\0".join((request.model.SerializeToString(deterministic=True),
                       request.role.SerializeToString(deterministic=True),
                       request.rendezvous.group_id.encode()))


def _stages(role: worker_pb2.Role) -> tuple[StageLayout, ...]:
    if role.stages:
        return tuple(StageLayout(s.layer_start, s.layer_end, s.tp_size) for s in role.stages)
    if role.num_stages > 1:
        raise SpotserveError("role.stages must list every stage of a multi-stage pipeline")
    return (StageLayout(role.layer_start, role.layer_end, role.tp_size or 1),)


def parse_role(request: worker_pb2.ConfigureRequest, model: ModelSpec) -> EpochRole:
    """Check a Configure request's role against the model; raise `SpotserveError`."""
    role, rdv = request.role, request.rendezvous
    stages = _stages(role)
    if role.num_stages and role.num_stages != len(stages):
        raise SpotserveError(f"role.num_stages is {role.num_stages} but {len(stages)} "
                             f"stages are listed")
    if role.stage >= len(stages):
        raise SpotserveError(f"role.stage {role.stage} is outside the pipeline's "
                             f"{len(stages)} stages")
    mine = stages[role.stage]
    if (mine.layer_start, mine.layer_end) != (role.layer_start, role.layer_end) or \
            mine.tp != (role.tp_size or 1):
        raise SpotserveError(f"role layers [{role.layer_start}, {role.layer_end}) x"
                             f"{role.tp_size} do not match stage {role.stage} of role.stages")
    if role.tp_rank >= mine.tp:
        raise SpotserveError(f"role.tp_rank {role.tp_rank} out of range for TP {mine.tp}")
    config = ParallelConfig((PipelineLayout(stages),))
    config.validate(model)
    out = EpochRole(request.epoch, config, Position(0, role.stage, role.tp_rank),
                    role.pipeline_id, rdv.master_address, rdv.group_id or f"e{request.epoch}")
    if out.world_size > 1:
        if not request.preload_only and (not rdv.master_address or
                                         ":" not in rdv.master_address):
            raise SpotserveError("a multi-GPU pipeline needs rendezvous.master_address host:port")
        if rdv.world_size != out.world_size or rdv.rank != out.rank:
            raise SpotserveError(f"rendezvous says rank {rdv.rank} of {rdv.world_size}; the "
                                 f"role is rank {out.rank} of {out.world_size}")
    return out


def join_world(role: EpochRole, backend: str, timeout_s: float) -> None:
    """Form the pipeline's torch.distributed world (blocks until every rank joins)."""
    import torch.distributed as dist
    if role.world_size == 1:
        return
    host, port = role.master_address.rsplit(":", 1)
    if host.startswith("127.") and backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, int(port), role.world_size,  # type: ignore[attr-defined]
                          is_master=role.rank == 0, timeout=timeout)
    prefixed = dist.PrefixStore(role.group_id, store)  # type: ignore[attr-defined]
    dist.init_process_group(backend, store=prefixed,
                            rank=role.rank, world_size=role.world_size, timeout=timeout)


def leave_world() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
