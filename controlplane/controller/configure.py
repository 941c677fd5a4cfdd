"""The Worker `Configure` call for one GPU's `WorkerAssignment` (pure).

Each pipeline of an epoch is its own torch.distributed world: rank r is the r-th GPU of
the pipeline counting stage by stage, TP rank within; its rendezvous store lives on the
driver's host, and its group id is the pipeline's id (which names the epoch that formed
it), so that a pipeline carried over unchanged is recognised by its workers and keeps
serving (the worker's fast path) while a regrouped one forms a new world.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from spotserve.layout import Position
from spotserve.model_spec import ModelSpec
from spotserve.v1 import common_pb2, worker_pb2

from ..planner.cluster import GpuId
from .actuator import DrainedRequest
from .epoch import CHECKPOINT, KEPT, WorkerAssignment

KINDS = {KEPT: worker_pb2.SOURCE_KIND_KEPT, CHECKPOINT: worker_pb2.SOURCE_KIND_CHECKPOINT}

Address = Callable[[GpuId], str]


def pipeline_members(jobs: Mapping[GpuId, WorkerAssignment]
                     ) -> dict[str, list[WorkerAssignment]]:
    """Pipeline id → its GPUs' assignments in rank order (stage, then TP rank)."""
    out: dict[str, list[WorkerAssignment]] = {}
    for job in jobs.values():
        out.setdefault(job.pipeline_id, []).append(job)
    for members in out.values():
        members.sort(key=lambda j: (j.position.stage, j.position.tp_rank))
    return out


def role(job: WorkerAssignment, members: Sequence[WorkerAssignment], address: Address,
         max_batch: int) -> worker_pb2.Role:
    stages = {m.position.stage: m.stage for m in members}
    return worker_pb2.Role(
        pipeline=job.position.pipeline, stage=job.position.stage,
        tp_rank=job.position.tp_rank, tp_size=job.stage.tp,
        layer_start=job.stage.layer_start, layer_end=job.stage.layer_end,
        num_stages=job.num_stages, tp_peers=[address(g) for g in job.tp_peers],
        prev_stage=address(job.prev_stage) if job.prev_stage else "",
        next_stage=address(job.next_stage) if job.next_stage else "",
        max_batch=max_batch, pipeline_id=job.pipeline_id,
        stages=[worker_pb2.StageShape(layer_start=stages[s].layer_start,
                                      layer_end=stages[s].layer_end, tp_size=stages[s].tp)
                for s in sorted(stages)])


def weight_sources(job: WorkerAssignment, address: Address) -> list[worker_pb2.WeightSource]:
    out = []
    for piece in job.pieces:
        p = piece.piece
        message = common_pb2.TensorSlice(tensor=p.tensor, dim=-1 if p.dim is None else p.dim,
                                         start=p.start, stop=p.stop)
        source = worker_pb2.WeightSource(slice=message,
                                         kind=KINDS.get(piece.kind, worker_pb2.SOURCE_KIND_PEER))
        source.peers.extend(address(g) for g in piece.peers)
        out.append(source)
    return out


def kv_imports(model: ModelSpec, requests: Sequence[DrainedRequest],
               holder: str) -> list[worker_pb2.KVImport]:
    """Whole-request KV imports of drained requests from the old driver that holds them."""
    return [worker_pb2.KVImport(
        slice=common_pb2.KVSlice(request_id=r.request_id, layer_start=0,
                                 layer_end=model.num_layers, head_start=0,
                                 head_stop=model.num_kv_heads, token_start=0,
                                 token_stop=r.kv_tokens),
        peers=[holder]) for r in requests if r.kv_tokens > 0]


def configure_request(model: ModelSpec, model_dir: str, epoch: int, job: WorkerAssignment,
                      members: Sequence[WorkerAssignment], address: Address, master: str,
                      max_batch: int, kv: Sequence[worker_pb2.KVImport] = ()
                      ) -> worker_pb2.ConfigureRequest:
    rank = next(i for i, m in enumerate(members) if m.gpu == job.gpu)
    rendezvous = worker_pb2.Rendezvous(
        master_address=master if len(members) > 1 else "", world_size=len(members), rank=rank,
        group_id=job.pipeline_id)
    return worker_pb2.ConfigureRequest(
        epoch=epoch, role=role(job, members, address, max_batch),
        model=worker_pb2.ModelRef(name=model.name, checkpoint_path=model_dir),
        weights=weight_sources(job, address), kv_imports=list(kv), rendezvous=rendezvous)


def signature(job: WorkerAssignment) -> tuple[object, ...]:
    """What must match for a worker to be left serving as it is."""
    return (job.pipeline_id, Position(0, job.position.stage, job.position.tp_rank),
            job.stage, job.num_stages, job.tp_peers, job.prev_stage, job.next_stage)
