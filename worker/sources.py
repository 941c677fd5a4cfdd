"""Where each slice of a new role comes from: the `Configure` sources a controller sends.

Pure functions over the shared layout math (`spotserve.layout.reshard_plan`): for a worker
taking `new_position`, every piece of every slice it needs is KEPT (it already holds it),
PEER (pull from the old positions holding it, doomed holders first, as the issue asks:
their data must leave before they do) or CHECKPOINT (nobody surviving holds it). Also the
KV imports of requests a drained pipeline hands to a new one. Torch-free.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from spotserve.layout import ParallelConfig, Position, TensorSlice, reshard_plan
from spotserve.model_spec import ModelSpec
from spotserve.v1 import common_pb2, worker_pb2


def slice_message(piece: TensorSlice) -> common_pb2.TensorSlice:
    if piece.dim is None:
        return common_pb2.TensorSlice(tensor=piece.tensor, dim=-1, start=piece.start,
                                      stop=piece.stop)
    return common_pb2.TensorSlice(tensor=piece.tensor, dim=piece.dim, start=piece.start,
                                  stop=piece.stop)


def layout_slice(message: common_pb2.TensorSlice) -> TensorSlice:
    dim = None if message.dim < 0 else message.dim
    return TensorSlice(message.tensor, dim, message.start, message.stop)


def weight_sources(model: ModelSpec, old: ParallelConfig | None,
                   old_addresses: Mapping[Position, str], new: ParallelConfig,
                   new_position: Position, *, kept_from: Position | None = None,
                   doomed: Collection[str] = ()) -> list[worker_pb2.WeightSource]:
    """The sources of every piece `new_position` needs. `kept_from` is the old position the
    receiving worker held (None for a fresh worker); `old_addresses` are the surviving old
    positions' workers. Pieces with a doomed holder come first."""
    available = [p for p in old_addresses if old is not None and p in old.positions()]
    out: list[tuple[int, worker_pb2.WeightSource]] = []
    for move in reshard_plan(model, old, new, available):
        if move.dst != new_position:
            continue
        source = worker_pb2.WeightSource(slice=slice_message(move.piece))
        if kept_from is not None and kept_from in move.sources:
            source.kind = worker_pb2.SOURCE_KIND_KEPT
        elif move.sources:
            peers = sorted({old_addresses[p] for p in move.sources},
                           key=lambda a: (a not in doomed, a))
            source.kind = worker_pb2.SOURCE_KIND_PEER
            source.peers.extend(peers)
        else:
            source.kind = worker_pb2.SOURCE_KIND_CHECKPOINT
        first = source.kind == worker_pb2.SOURCE_KIND_PEER and source.peers[0] in doomed
        out.append((0 if first else 1, source))
    return [s for _, s in sorted(out, key=lambda pair: pair[0])]


def kv_imports(model: ModelSpec, progress: Iterable[common_pb2.RequestProgress],
               holders: list[str]) -> list[worker_pb2.KVImport]:
    """Whole-request KV imports for the requests a drain kept, from `holders` (the old
    pipeline's driver, which keeps its paused requests' KV)."""
    out = []
    for request in progress:
        if not request.kv_kept or request.kv_tokens == 0:
            continue
        piece = common_pb2.KVSlice(request_id=request.request_id, layer_start=0,
                                   layer_end=model.num_layers, head_start=0,
                                   head_stop=model.num_kv_heads, token_start=0,
                                   token_stop=request.kv_tokens)
        out.append(worker_pb2.KVImport(slice=piece, peers=holders))
    return out


def role_message(config: ParallelConfig, position: Position, addresses: Mapping[Position, str],
                 pipeline_id: str = "") -> worker_pb2.Role:
    """The `Role` of the worker at `position` (a position of `config`), whose pipeline's
    workers are `addresses`."""
    pipe = config.pipelines[position.pipeline]
    stage = pipe.stages[position.stage]

    def driver_of(s: int) -> str:
        if not 0 <= s < len(pipe.stages):
            return ""
        return addresses[Position(position.pipeline, s, 0)]

    return worker_pb2.Role(
        pipeline=position.pipeline, stage=position.stage, tp_rank=position.tp_rank,
        tp_size=stage.tp, layer_start=stage.layer_start, layer_end=stage.layer_end,
        num_stages=len(pipe.stages), max_batch=config.batch,
        tp_peers=[addresses[Position(position.pipeline, position.stage, t)]
                  for t in range(stage.tp)],
        prev_stage=driver_of(position.stage - 1), next_stage=driver_of(position.stage + 1),
        pipeline_id=pipeline_id or f"p{position.pipeline}", driver=driver_of(0),
        stages=[worker_pb2.StageShape(layer_start=s.layer_start, layer_end=s.layer_end,
                                      tp_size=s.tp) for s in pipe.stages])


def rendezvous(config: ParallelConfig, position: Position, master_address: str,
               group_id: str) -> worker_pb2.Rendezvous:
    """The pipeline's world: rank = the position's index in its pipeline, stage by stage."""
    mine = [p for p in config.positions() if p.pipeline == position.pipeline]
    return worker_pb2.Rendezvous(master_address=master_address, world_size=len(mine),
                                 rank=mine.index(position), group_id=group_id)


def configure_request(model: ModelSpec, epoch: int, config: ParallelConfig, position: Position,
                      addresses: Mapping[Position, str], *, master_address: str = "",
                      old: ParallelConfig | None = None,
                      old_addresses: Mapping[Position, str] | None = None,
                      kv: Iterable[worker_pb2.KVImport] = ()) -> worker_pb2.ConfigureRequest:
    """The whole `Configure` call for the worker at `position` of `config` (placed on
    `addresses`), coming from `old` (placed on `old_addresses`, the survivors)."""
    old_addresses = old_addresses or {}
    me = addresses[position]
    kept_from = next((p for p, a in old_addresses.items() if a == me), None)
    group = f"epoch{epoch}-p{position.pipeline}"
    return worker_pb2.ConfigureRequest(
        epoch=epoch, role=role_message(config, position, addresses),
        rendezvous=rendezvous(config, position, master_address, group),
        weights=weight_sources(model, old, old_addresses, config, position,
                               kept_from=kept_from),
        kv_imports=list(kv))
