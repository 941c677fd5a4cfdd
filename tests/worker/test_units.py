"""Unit tests of the worker's pure pieces: Configure sources from the layout math, role
parsing, KV slicing of paused requests, sampling defaults."""

from __future__ import annotations

import itertools

import pytest
import torch

from spotserve.errors import SpotserveError
from spotserve.layout import ParallelConfig, Position, position_slices
from spotserve.model_spec import ModelSpec
from spotserve.v1 import common_pb2, worker_pb2
from spotserve.worker import health, sources
from spotserve.worker.epoch import parse_role
from spotserve.worker.kv_store import PausedRequests
from spotserve.worker.requests import sampling_params
from spotserve.worker.tensor_store import SliceError

SPEC = ModelSpec.from_hf_config({
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 128, "max_position_embeddings": 256, "torch_dtype": "float32"})
OLD = ParallelConfig.uniform(4, 1, 1, 2)
NEW = ParallelConfig.uniform(4, 1, 2, 1)
A, B = "127.0.0.2:1", "127.0.0.3:1"
OLD_ADDRESSES = {Position(0, 0, 0): A, Position(0, 0, 1): B}


def _covered(found: list[worker_pb2.WeightSource], position: Position) -> None:
    """The sources cut every slice the position needs into disjoint pieces covering it."""
    for want in position_slices(SPEC, NEW, position):
        pieces = sorted((s.slice.start, s.slice.stop) for s in found
                        if s.slice.tensor == want.tensor)
        if want.dim is None:
            assert len(pieces) == 1
            continue
        assert pieces[0][0] == want.start and pieces[-1][1] == want.stop
        assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))


def test_sources_keep_what_is_held_and_pull_the_rest() -> None:
    found = sources.weight_sources(SPEC, OLD, OLD_ADDRESSES, NEW, Position(0, 0, 0),
                                   kept_from=Position(0, 0, 0))
    kinds = {s.kind for s in found}
    assert kinds == {worker_pb2.SOURCE_KIND_KEPT, worker_pb2.SOURCE_KIND_PEER}
    assert all(list(s.peers) == [B] for s in found if s.kind == worker_pb2.SOURCE_KIND_PEER)
    _covered(found, Position(0, 0, 0))


def test_sources_list_doomed_holders_first_and_fall_back_to_the_checkpoint() -> None:
    fresh = sources.weight_sources(SPEC, OLD, OLD_ADDRESSES, NEW, Position(0, 1, 0),
                                   doomed={B})
    peers = [s for s in fresh if s.kind == worker_pb2.SOURCE_KIND_PEER]
    first_a = next(i for i, s in enumerate(fresh) if s.peers and s.peers[0] == A)
    assert all(s.peers[0] == B for s in peers[:first_a])
    survivors = {Position(0, 0, 0): A}
    alone = sources.weight_sources(SPEC, OLD, survivors, NEW, Position(0, 1, 0))
    assert {s.kind for s in alone} == {worker_pb2.SOURCE_KIND_PEER,
                                       worker_pb2.SOURCE_KIND_CHECKPOINT}
    _covered(alone, Position(0, 1, 0))


def test_role_round_trip_and_errors() -> None:
    addresses = {Position(0, 0, 0): A, Position(0, 1, 0): B}
    request = sources.configure_request(SPEC, 3, NEW, Position(0, 1, 0), addresses,
                                        master_address="127.0.0.2:9")
    role = parse_role(request, SPEC)
    assert (role.rank, role.world_size, role.is_driver) == (1, 2, False)
    assert request.role.prev_stage == A and request.role.next_stage == ""
    request.rendezvous.rank = 0
    with pytest.raises(SpotserveError, match="rendezvous says rank 0"):
        parse_role(request, SPEC)
    request.role.ClearField("stages")
    with pytest.raises(SpotserveError, match=r"role\.stages"):
        parse_role(request, SPEC)


def test_kv_slices_of_paused_requests() -> None:
    paused = PausedRequests()
    kv = torch.arange(4 * 2 * 5 * 2 * 16, dtype=torch.float32).view(4, 2, 5, 2, 16)
    paused.put_kv("r", kv)
    piece = common_pb2.KVSlice(request_id="r", layer_start=1, layer_end=3, head_start=1,
                               head_stop=2, token_start=0, token_stop=4)
    blob = paused.blob(piece)
    got = torch.frombuffer(bytearray(blob.data), dtype=torch.float32).view(blob.shape)
    assert torch.equal(got, kv[1:3, :, 0:4, 1:2])
    piece.token_stop = 6
    with pytest.raises(SliceError, match=r"tokens \[0, 6\) outside the held \[0, 5\)"):
        paused.blob(piece)
    with pytest.raises(SliceError, match="no KV cache held"):
        paused.blob(common_pb2.KVSlice(request_id="ghost", layer_end=1))


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
