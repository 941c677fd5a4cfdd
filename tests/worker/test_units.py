"""Unit tests of the worker's pure pieces, fed the messages the controller builds: the
weight sources of a Configure (kept / peer / checkpoint, doomed holders first), role
parsing, the KV slices a rank serves from its shares, sampling defaults."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from spotserve.catalog import Catalog
from spotserve.errors import SpotserveError
from spotserve.layout import ParallelConfig, Position, position_slices
from spotserve.model_spec import ModelSpec
from spotserve.operator.controller.configure import configure_request, pipeline_members
from spotserve.operator.controller.epoch import (
    CHECKPOINT,
    KEPT,
    PEER,
    SlicePiece,
    WorkerAssignment,
    epoch_jobs,
)
from spotserve.operator.local.runner import CATALOG
from spotserve.operator.planner.cluster import GpuId, Instance, Placement
from spotserve.v1 import common_pb2, worker_pb2
from spotserve.worker import health
from spotserve.worker.engine.kv_shares import KVPiece, KVShares
from spotserve.worker.epoch import parse_role
from spotserve.worker.kv_store import blob_of
from spotserve.worker.requests import sampling_params
from spotserve.worker.tensor_store import SliceError

SPEC = ModelSpec.from_hf_config({
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 128, "max_position_embeddings": 256, "torch_dtype": "float32"})
KIND = Catalog.load(CATALOG).instance("cpu-1x")
OLD = ParallelConfig.uniform(4, 1, 1, 2)
NEW = ParallelConfig.uniform(4, 1, 2, 1)
A, B = GpuId("a", 0), GpuId("b", 0)
BEFORE = Placement.of(OLD, {Position(0, 0, 0): A, Position(0, 0, 1): B})
AFTER = Placement.of(NEW, {Position(0, 0, 0): A, Position(0, 1, 0): B})


def _covered(job_pieces: tuple[SlicePiece, ...], position: Position) -> None:
    """The pieces cut every slice the position needs into disjoint parts covering it."""
    for want in position_slices(SPEC, NEW, position):
        spans = sorted((p.piece.start, p.piece.stop) for p in job_pieces
                       if p.piece.tensor == want.tensor)
        if want.dim is None:
            assert len(spans) == 1
            continue
        assert spans[0][0] == want.start and spans[-1][1] == want.stop
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


def _jobs(states: dict[str, str], placement: Placement = AFTER
          ) -> dict[GpuId, WorkerAssignment]:
    instances = [Instance(name, KIND, state=state) for name, state in states.items()]
    return epoch_jobs(SPEC, 2, placement, BEFORE, instances)


def test_sources_keep_what_is_held_and_pull_the_rest() -> None:
    job = _jobs({"a": "running", "b": "running"})[A]
    assert {p.kind for p in job.pieces} == {KEPT, PEER}
    assert all(p.peers == (B,) for p in job.pieces if p.kind == PEER)
    _covered(job.pieces, Position(0, 0, 0))


def test_doomed_holders_send_and_lost_ones_fall_back_to_the_checkpoint() -> None:
    moved = Placement.of(NEW, {Position(0, 0, 0): A, Position(0, 1, 0): GpuId("c", 0)})
    doomed = _jobs({"a": "running", "b": "doomed", "c": "joining"}, moved)[GpuId("c", 0)]
    assert any(p.peers == (B,) for p in doomed.pieces)
    lost = _jobs({"a": "running", "b": "lost", "c": "joining"}, moved)[GpuId("c", 0)]
    assert {p.kind for p in lost.pieces} == {PEER, CHECKPOINT}
    assert all(B not in p.peers for p in lost.pieces)
    _covered(lost.pieces, Position(0, 1, 0))


def test_role_round_trip_and_errors() -> None:
    jobs = _jobs({"a": "running", "b": "running"})
    (group,) = pipeline_members(jobs).values()
    request = configure_request(SPEC, "/models", 2, jobs[B], group,
                                lambda g: f"{g.instance}:1", "a:9", 8)
    role = parse_role(request, SPEC)
    assert (role.rank, role.world_size, role.is_driver) == (1, 2, False)
    assert request.role.prev_stage == "a:1" and request.role.next_stage == ""
    request.rendezvous.rank = 0
    with pytest.raises(SpotserveError, match="rendezvous says rank 0"):
        parse_role(request, SPEC)
    request.role.ClearField("stages")
    with pytest.raises(SpotserveError, match=r"role\.stages"):
        parse_role(request, SPEC)


def test_a_rank_serves_kv_slices_from_the_pieces_it_holds() -> None:
    shares = KVShares()
    kv = torch.arange(4 * 2 * 5 * 2 * 16, dtype=torch.float32).view(4, 2, 5, 2, 16)
    shares.put("r", KVPiece((0, 2), (0, 2), (0, 5), kv[0:2].clone()))  # its own share
    shares.put("r", KVPiece((2, 4), (1, 2), (0, 5), kv[2:4, :, :, 1:2].clone()))  # pulled
    blob = blob_of(shares)
    piece = common_pb2.KVSlice(request_id="r", layer_start=1, layer_end=3, head_start=1,
                               head_stop=2, token_start=0, token_stop=4)
    got = torch.frombuffer(bytearray(blob(piece).data), dtype=torch.float32)
    assert torch.equal(got.view(2, 2, 4, 1, 16), kv[1:3, :, 0:4, 1:2])
    assert shares.tokens("r") == 5
    piece.head_start = 0  # layer 2, head 0 is held by nobody here
    with pytest.raises(SliceError, match="no KV cache held"):
        blob(piece)
    piece.head_start, piece.token_stop = 1, 6
    with pytest.raises(SliceError, match="no KV cache held"):
        blob(piece)
    with pytest.raises(SliceError, match="no KV cache held"):
        blob(common_pb2.KVSlice(request_id="ghost", layer_end=1, head_stop=1, token_stop=1))


def test_sampling_defaults_follow_the_contract() -> None:
    request = worker_pb2.SubmitRequest(request_id="r",
                                       sampling=common_pb2.SamplingParams(max_tokens=3))
    params = sampling_params(request)
    assert (params.temperature, params.top_p, params.top_k) == (1.0, 1.0, 0)
    assert params.seed == sampling_params(request).seed   # derived from the request id
    request.sampling.temperature = 0.0
    assert sampling_params(request).greedy


def test_health_request_decoding() -> None:
    assert health._decode_service(b"") == ""
    assert health._decode_service(b"\x0a\x13spotserve.v1.Worker") == "spotserve.v1.Worker"


def test_kept_pieces_of_a_new_tp_slice_are_copied_on_the_device(tmp_path: Path) -> None:
    """TP 1 -> TP 2 on a GPU: every kept piece of rank 1's new (narrower) slices is left
    by the gather for a device-to-device copy from the old stage's tensors (none is cut
    from the host copy, none read from the checkpoint: there is none here), and the new
    stage holds exactly what a fresh load of rank 1 holds."""
    import asyncio

    from spotserve.worker.model.decoder import StageModel
    from spotserve.worker.model.loader import copy_on_device, load_into, load_stage
    from spotserve.worker.tensor_store import TensorStore
    from spotserve.worker.weights import gather
    from tests.engine.tiny_models import save_tiny

    folder = save_tiny(tmp_path / "m", "qwen2", seed=3)
    old = load_stage(folder, ParallelConfig.uniform(4, 1, 1, 1), Position(0, 0, 0))
    spec, new_config, rank1 = old.spec, ParallelConfig.uniform(4, 1, 1, 2), Position(0, 0, 1)

    async def no_peers(items: object) -> None:
        raise AssertionError("nothing is pulled")

    tensors, stats = asyncio.run(gather(spec, new_config, rank1, [], TensorStore(), None,
                                        no_peers, on_device={s.tensor: s for s in old.slices}))
    wanted = position_slices(spec, new_config, rank1)
    assert {want.tensor for want, _ in stats.on_device} == {s.tensor for s in wanted}
    assert stats.bytes_from_checkpoint == stats.bytes_pulled == 0
    params = dict(old.named_parameters())
    held = {s.tensor: (s, params[s.tensor]) for s in old.slices}
    new = StageModel(spec, new_config, rank1, reuse=old)
    load_into(new, tensors)
    copy_on_device(new, stats.on_device, held)
    fresh = dict(load_stage(folder, new_config, rank1).named_parameters())
    for name, param in new.named_parameters():
        assert torch.equal(param, fresh[name]), name
