"""The Worker `Configure` call for one GPU's `WorkerAssignment` (pure).

Each pipeline of an epoch is its own torch.distributed world: rank r is the r-th GPU of
the pipeline counting stage by stage, TP rank within; its rendezvous store lives on the
driver's host, and its group id is the pipeline's id (which names the epoch that formed
it), so that a pipeline carried over unchanged is recognised by its workers and keeps
serving (the worker's fast path) while a regrouped one forms a new world.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

from spotserve.catalog import InstanceType
from spotserve.layout import Position
from spotserve.model_spec import ModelSpec
from spotserve.v1 import common_pb2, worker_pb2

from ..planner.cluster import GpuId, Instance, Placement
from ..planner.migration import MigrationPlan
from .actuator import DrainedRequest
from .epoch import CHECKPOINT, KEPT, WorkerAssignment, epoch_jobs, hand_plan

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


def kv_imports(job: WorkerAssignment, drained: Mapping[int, Sequence[DrainedRequest]],
               address: Callable[[GpuId], str | None]) -> list[worker_pb2.KVImport]:
    """This GPU's pieces of the KV caches its pipeline inherits, as the migration plan
    assigns them (`job.kv`: per layer, a KV head range and the old GPU that held it), for
    every drained request that kept its cache: from that GPU first, then from its old
    pipeline's driver (which also holds each whole cache when a rank was leaving).
    Consecutive layers from one holder travel as one slice. `address` is None for a GPU
    that is gone; a piece nobody can send is left out (its request re-prefills)."""
    runs: dict[tuple[int, GpuId, int, int], list[int]] = {}
    for piece in job.kv:
        key = (piece.old_pipeline, piece.src, piece.head_start, piece.head_stop)
        runs.setdefault(key, []).append(piece.layer)
    drivers = dict(job.kv_holders)
    out = []
    for (old, src, head_start, head_stop), layers in runs.items():
        driver = drivers.get(old)
        fallback = address(driver) if driver is not None else None
        peers = list(dict.fromkeys(a for a in (address(src), fallback) if a))
        if not peers:
            continue
        for start, stop in _spans(sorted(layers)):
            out += [worker_pb2.KVImport(
                slice=common_pb2.KVSlice(request_id=r.request_id, layer_start=start,
                                         layer_end=stop, head_start=head_start,
                                         head_stop=head_stop, token_start=0,
                                         token_stop=r.kv_tokens), peers=peers)
                for r in drained.get(old, ()) if r.kv_tokens > 0]
    return out


def _spans(layers: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted layer numbers as [start, stop) runs of consecutive layers."""
    out: list[tuple[int, int]] = []
    for layer in layers:
        if out and out[-1][1] == layer:
            out[-1] = (out[-1][0], layer + 1)
        else:
            out.append((layer, layer + 1))
    return out


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


def epoch_requests(model: ModelSpec, model_dir: str, epoch: int,
                   jobs: Mapping[GpuId, WorkerAssignment],
                   drained: Mapping[int, Sequence[DrainedRequest]], address: Address,
                   reachable: Callable[[GpuId], str | None],
                   rendezvous: Callable[[GpuId], str], max_batch: int,
                   serves: Callable[[WorkerAssignment], bool] = lambda job: False
                   ) -> list[tuple[WorkerAssignment, worker_pb2.ConfigureRequest]]:
    """The Configure of every GPU of `jobs`, pipeline by pipeline (a pipeline regroups
    whole: every rank joins the new world on its driver's `rendezvous` address), with the
    KV pieces each imports from `drained` requests. A pipeline all of whose jobs `serves`
    (already runs exactly that role) and that imports nothing is left out: it keeps
    serving; one that imports KV takes it on its fast path, still serving."""
    out = []
    for group in pipeline_members(jobs).values():
        imports = {job.gpu: kv_imports(job, drained, reachable) for job in group}
        if all(serves(job) for job in group) and not any(imports.values()):
            continue
        master = rendezvous(group[0].gpu)
        out += [(job, configure_request(model, model_dir, epoch, job, group, address, master,
                                        max_batch, imports[job.gpu])) for job in group]
    return out


def explicit_epoch(model: ModelSpec, model_dir: str, epoch: int, new: Placement,
                   old: Placement | None, addresses: Mapping[GpuId, str],
                   kind: InstanceType, *, old_ids: Sequence[str] = ("p0",),
                   drained: Sequence[DrainedRequest] = (), lost: Collection[GpuId] = (),
                   doomed: Collection[GpuId] = (), free_port: Callable[[str], int]
                   ) -> list[tuple[GpuId, worker_pb2.ConfigureRequest]]:
    """Every Configure of a move chosen by hand rather than planned (tests and benchmarks
    that drive workers without a controller), built exactly as the controller builds a
    planned one: `new` and `old` on one-GPU instances of `kind` (`lost` ones gone with
    their data, `doomed` ones still readable), old pipeline 0's `drained` requests handed
    to new pipeline 0 with their KV caches."""
    tokens = sum(r.kv_tokens for r in drained)
    jobs = epoch_jobs(model, epoch, new, old, _instances(old, addresses, kind, lost, doomed),
                      ((0, 0),) if tokens else (), {0: tokens}, old_ids)
    host = {g: addresses[g].rsplit(":", 1)[0] for g in addresses}
    built = epoch_requests(model, model_dir, epoch, jobs, {0: drained}, addresses.__getitem__,
                           lambda g: None if g in lost else addresses[g],
                           # torch's store listens on every address: free on all of them
                           lambda driver: f"{host[driver]}:{free_port('')}",
                           new.config.batch)
    return [(job.gpu, request) for job, request in built]


def explicit_plan(model: ModelSpec, new: Placement, old: Placement | None,
                  addresses: Mapping[GpuId, str], kind: InstanceType, *,
                  drained: Sequence[DrainedRequest] = (), lost: Collection[GpuId] = (),
                  doomed: Collection[GpuId] = ()) -> MigrationPlan:
    """The migration plan `explicit_epoch` carries out for the same arguments: the bytes
    and the time the planner expects, to hold against what the workers report."""
    tokens = sum(r.kv_tokens for r in drained)
    return hand_plan(model, new, old, _instances(old, addresses, kind, lost, doomed),
                     ((0, 0),) if tokens else (), {0: tokens})


def _instances(old: Placement | None, addresses: Mapping[GpuId, str], kind: InstanceType,
               lost: Collection[GpuId], doomed: Collection[GpuId]) -> list[Instance]:
    held = old.instances() if old else set()
    return [Instance(g.instance, kind, state="lost" if g in lost else "doomed"
                     if g in doomed else "running" if g.instance in held else "joining")
            for g in addresses]
