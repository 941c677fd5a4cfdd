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
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

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
    model, role and process group. The pipeline's index in the configuration and its batch
    size do not count: a pipeline that keeps its GPUs and layout while the others change
    (a shrink renumbers it, a new plan resizes its batch) goes on serving, and takes the
    new batch size live."""
    role = worker_pb2.Role()
    role.CopyFrom(request.role)
    role.ClearField("pipeline")
    role.ClearField("max_batch")
    return b"\0".join((request.model.SerializeToString(deterministic=True),
                       role.SerializeToString(deterministic=True),
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


class JoinAborted(Exception):
    """The rendezvous was given up: a newer Configure superseded it, or its caller left."""


def join_world(role: EpochRole, backend: str, timeout_s: float,
               abort: threading.Event | None = None, connect_s: float = 10.0) -> None:
    """Form the pipeline's torch.distributed world: every rank checks in on the driver's
    store, then the group connects (within `connect_s`). Waits at most `timeout_s` for the
    ranks to check in, and gives up at once (`JoinAborted`) when `abort` is set, so a
    worker never stays stuck in the rendezvous of an epoch that is gone."""
    import torch.distributed as dist
    if role.world_size == 1:
        return
    host, port = role.master_address.rsplit(":", 1)
    if host.startswith("127.") and backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    give_up = time.monotonic() + timeout_s
    store = _store(host, int(port), role, give_up, abort)
    prefixed = dist.PrefixStore(role.group_id, store)  # type: ignore[attr-defined]
    try:
        prefixed.set(f"arrived/{role.rank}", "1")
        arrived = [f"arrived/{r}" for r in range(role.world_size)]
        while True:
            try:
                prefixed.wait(arrived, timedelta(seconds=0.25))
                break
            except RuntimeError:  # not all here yet (torch raises DistStoreError)
                _check(role, give_up, abort)
        dist.init_process_group(backend, store=prefixed, rank=role.rank,
                                world_size=role.world_size,
                                timeout=timedelta(seconds=connect_s))
    except BaseException:
        # the traceback keeps this frame: drop the store now, or the driver's listening
        # socket outlives the failed rendezvous and holds its port
        del prefixed, store
        raise


def _store(host: str, port: int, role: EpochRole, give_up: float,
           abort: threading.Event | None) -> Any:
    """The driver hosts the pipeline's store; the others connect to it, retrying until
    it is up (or the rendezvous is given up)."""
    import torch.distributed as dist
    if role.rank == 0:
        return dist.TCPStore(host, port, role.world_size, is_master=True,  # type: ignore[attr-defined]
                             timeout=timedelta(seconds=30), wait_for_workers=False)
    while True:
        try:
            return dist.TCPStore(host, port, role.world_size, is_master=False,  # type: ignore[attr-defined]
                                 timeout=timedelta(seconds=1))
        except RuntimeError:  # the driver's store is not listening yet
            _check(role, give_up, abort)


def _check(role: EpochRole, give_up: float, abort: threading.Event | None) -> None:
    if abort is not None and abort.is_set():
        raise JoinAborted(f"the rendezvous of {role.group_id} was superseded")
    if time.monotonic() > give_up:
        raise TimeoutError(f"the ranks of pipeline {role.pipeline_id} did not all check in "
                           f"at {role.master_address} in time")


def leave_world() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
