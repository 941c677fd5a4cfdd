"""Layout math: partitions, reshard plans and shared bytes (property tests)."""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotserve.errors import SpotserveError
from spotserve.layout import (
    ParallelConfig,
    Position,
    TensorSlice,
    kv_heads,
    kv_reshard_plan,
    position_kv_bytes_per_token,
    position_slices,
    position_weight_bytes,
    reshard_plan,
    shared_kv_bytes,
    shared_weight_bytes,
    slice_overlap,
    split_layers,
)
from spotserve.model_spec import ModelSpec
from spotserve.models import builtin_models

from .strategies import configs, tiny_models

model_and_config = tiny_models().flatmap(lambda m: st.tuples(st.just(m), configs(m)))
model_and_two_configs = tiny_models().flatmap(
    lambda m: st.tuples(st.just(m), configs(m), configs(m)))


def _elements(s: TensorSlice, shape: tuple[int, ...]) -> range:
    return range(s.start, s.stop) if s.dim is not None else range(shape[0])


@settings(max_examples=150, deadline=None)
@given(model_and_config)
def test_each_pipeline_holds_every_element_of_every_tensor(
        case: tuple[ModelSpec, ParallelConfig]) -> None:
    model, config = case
    config.validate(model)
    for d in range(config.data):
        held: dict[str, set[int]] = defaultdict(set)
        for pos in (p for p in config.positions() if p.pipeline == d):
            for s in position_slices(model, config, pos):
                held[s.tensor].update(_elements(s, model.tensor(s.tensor).shape))
        for tensor in model.tensors():
            dim = tensor.split.dim
            assert held[tensor.name] == set(range(tensor.shape[0 if dim is None else dim]))


@settings(max_examples=150, deadline=None)
@given(model_and_config)
def test_tp_ranks_hold_disjoint_or_identical_ranges(
        case: tuple[ModelSpec, ParallelConfig]) -> None:
    model, config = case
    by_stage: dict[tuple[int, int, str], set[tuple[int, int]]] = defaultdict(set)
    for pos in config.positions():
        for s in position_slices(model, config, pos):
            by_stage[(pos.pipeline, pos.stage, s.tensor)].add((s.start, s.stop))
    for (_, _, tensor), ranges in by_stage.items():
        spec = model.tensor(tensor)
        ordered = sorted(ranges)
        total = sum(b - a for a, b in ordered)
        size = spec.shape[spec.split.dim] if spec.split.dim is not None else spec.shape[0]
        assert total == size, f"{tensor}: distinct slices {ordered} do not tile {size}"
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ordered))


@settings(max_examples=150, deadline=None)
@given(model_and_two_configs)
def test_reshard_plan_reconstructs_every_slice_once(
        case: tuple[ModelSpec, ParallelConfig, ParallelConfig]) -> None:
    model, old, new = case
    moves = reshard_plan(model, old, new)
    got: dict[tuple[Position, str], list[tuple[int, int]]] = defaultdict(list)
    old_held = {p: {s.tensor: s for s in position_slices(model, old, p)}
                for p in old.positions()}
    for move in moves:
        got[(move.dst, move.piece.tensor)].append((move.piece.start, move.piece.stop))
        assert move.sources, "a complete old configuration holds every piece"
        for src in move.sources:
            held = old_held[src][move.piece.tensor]
            piece = move.piece
            assert held.dim is None or held.start <= piece.start <= piece.stop <= held.stop
    for dst in new.positions():
        for want in position_slices(model, new, dst):
            pieces = sorted(got[(dst, want.tensor)])
            assert pieces[0][0] == want.start and pieces[-1][1] == want.stop
            assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))


@settings(max_examples=60, deadline=None)
@given(model_and_two_configs, st.data())
def test_reshard_from_survivors_falls_back_to_checkpoint(
        case: tuple[ModelSpec, ParallelConfig, ParallelConfig], data: st.DataObject) -> None:
    model, old, new = case
    survivors = data.draw(st.sets(st.sampled_from(old.positions())))
    for move in reshard_plan(model, old, new, available=survivors):
        assert set(move.sources) <= survivors
    if not survivors:
        assert all(not m.sources for m in reshard_plan(model, old, new, available=()))


@settings(max_examples=150, deadline=None)
@given(model_and_two_configs, st.data())
def test_shared_bytes_symmetric_bounded_and_exact(
        case: tuple[ModelSpec, ParallelConfig, ParallelConfig], data: st.DataObject) -> None:
    model, a, b = case
    pa = data.draw(st.sampled_from(a.positions()))
    pb = data.draw(st.sampled_from(b.positions()))
    ab = shared_weight_bytes(model, a, pa, b, pb)
    assert ab == shared_weight_bytes(model, b, pb, a, pa)
    assert 0 <= ab <= min(position_weight_bytes(model, a, pa), position_weight_bytes(model, b, pb))
    # the fast per-layer form equals the slice-by-slice oracle
    held = {s.tensor: s for s in position_slices(model, a, pa)}
    oracle = sum(slice_overlap(model.tensor(s.tensor), held[s.tensor], s)
                 for s in position_slices(model, b, pb) if s.tensor in held)
    assert ab == oracle * model.dtype_bytes
    kv = shared_kv_bytes(model, a, pa, b, pb, tokens=7)
    assert kv == shared_kv_bytes(model, b, pb, a, pa, tokens=7)
    assert kv <= 7 * min(position_kv_bytes_per_token(model, a, pa),
                         position_kv_bytes_per_token(model, b, pb))


@settings(max_examples=100, deadline=None)
@given(model_and_two_configs, st.data())
def test_kv_reshard_tiles_the_heads_each_new_position_caches(
        case: tuple[ModelSpec, ParallelConfig, ParallelConfig], data: st.DataObject) -> None:
    model, old, new = case
    op = data.draw(st.integers(0, old.data - 1))
    np_ = data.draw(st.integers(0, new.data - 1))
    moves = kv_reshard_plan(model, old, op, new, np_)
    for dst in (p for p in new.positions() if p.pipeline == np_):
        stage = new.stage_of(dst)
        lo, hi = kv_heads(model, stage.tp, dst.tp_rank)
        for layer in stage.layers():
            pieces = sorted((m.head_start, m.head_stop) for m in moves
                            if m.dst == dst and m.layer == layer)
            assert pieces[0][0] == lo and pieces[-1][1] == hi
            assert all(x[1] == y[0] for x, y in itertools.pairwise(pieces))
    assert all(m.sources for m in moves)


def test_single_gpu_holds_the_whole_model() -> None:
    for model in builtin_models().values():
        config = ParallelConfig.uniform(model.num_layers, 1, 1, 1)
        assert position_weight_bytes(model, config, Position(0, 0, 0)) == model.weight_bytes


def test_tensor_parallel_splits_llama_70b_evenly() -> None:
    model = builtin_models()["llama-3.1-70b"]
    config = ParallelConfig.uniform(model.num_layers, 1, 2, 8)
    sizes = [position_weight_bytes(model, config, p) for p in config.positions()]
    # every GPU holds about 1/16 of the weights (norms are replicated)
    assert max(sizes) / (model.weight_bytes / 16) < 1.01
    # 8 KV heads over TP 8: one KV head per rank, none replicated
    assert [kv_heads(model, 8, r) for r in range(8)] == [(r, r + 1) for r in range(8)]
    assert [kv_heads(model, 16, r) for r in range(16)][:4] == [(0, 1), (0, 1), (1, 2), (1, 2)]


def test_split_layers_is_balanced_and_front_loaded() -> None:
    assert split_layers(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert split_layers(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_invalid_configurations_are_rejected_with_reasons() -> None:
    model = builtin_models()["opt-30b"]  # 56 heads
    with pytest.raises(SpotserveError, match="TP degree 16"):
        ParallelConfig.uniform(model.num_layers, 1, 1, 16).validate(model)
    with pytest.raises(SpotserveError, match="exceeds"):
        ParallelConfig.uniform(model.num_layers, 1, 49, 1)
    with pytest.raises(SpotserveError, match="at least 1"):
        ParallelConfig.uniform(model.num_layers, 0, 1, 1)


def test_migration_between_paper_configs_keeps_what_it_can() -> None:
    model = builtin_models()["gpt-20b"]
    old = ParallelConfig.uniform(model.num_layers, 2, 3, 4)
    new = ParallelConfig.uniform(model.num_layers, 1, 3, 4)
    same = Position(0, 1, 2)
    assert shared_weight_bytes(model, old, same, new, same) == \
        position_weight_bytes(model, new, same)
