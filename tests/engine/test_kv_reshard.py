"""Property test: a request's KV cache, published rank by rank under one configuration and
staged/adopted under another (pieces chosen by `kv_reshard_plan`), is the same cache."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spotserve.layout import ParallelConfig, Position, kv_heads, kv_reshard_plan
from spotserve.model_spec import ModelSpec
from spotserve.worker.engine.kv_cache import KVCache
from spotserve.worker.engine.runner import KVPiece

HEAD_DIM, BLOCK = 4, 4


def _spec(layers: int, heads: int, kv: int) -> ModelSpec:
    return ModelSpec(name="t", family="llama", hidden_size=heads * HEAD_DIM,
                     intermediate_size=8, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                     head_dim=HEAD_DIM, vocab_size=11, max_position=64, dtype="float32")


def _caches(spec: ModelSpec, config: ParallelConfig) -> dict[Position, KVCache]:
    out = {}
    for pos in config.positions():
        stage = config.stage_of(pos)
        out[pos] = KVCache(stage.layers(), kv_heads(spec, stage.tp, pos.tp_rank), HEAD_DIM,
                           num_blocks=8, block_size=BLOCK, dtype=torch.float32)
    return out


configs = st.sampled_from([(1, 1), (1, 2), (2, 1), (2, 2), (1, 4), (3, 1), (2, 4)])


@settings(max_examples=40, deadline=None)
@given(configs, configs, st.sampled_from([1, 2, 4]), st.integers(1, 20))
def test_publish_stage_adopt_preserves_the_cache(old_pm: tuple[int, int],
                                                 new_pm: tuple[int, int], kv: int,
                                                 tokens: int) -> None:
    spec = _spec(layers=4, heads=8, kv=kv)
    old, new = (ParallelConfig.uniform(4, 1, p, m) for p, m in (old_pm, new_pm))
    full = torch.randn(4, 2, tokens, kv, HEAD_DIM)
    old_table, new_table = [5, 2, 7, 0, 1], [3, 6, 1, 4, 0]
    published = {}
    for pos, cache in _caches(spec, old).items():   # each old rank holds and publishes its share
        layers = (cache.layer_range.start, cache.layer_range.stop)
        h0, h1 = cache.head_range
        cache.write(old_table, layers, (h0, h1), (0, tokens),
                    full[layers[0]:layers[1], :, :, h0:h1])
        published[pos] = KVPiece(layers, (h0, h1), (0, tokens),
                                 cache.read(old_table, layers, (h0, h1), (0, tokens)))
    new_caches = _caches(spec, new)
    for move in kv_reshard_plan(spec, old, 0, new, 0):
        piece = published[move.sources[0]].cut((move.layer, move.layer + 1),
                                                (move.head_start, move.head_stop))
        new_caches[move.dst].write(new_table, piece.layers, piece.heads, piece.tokens,
                                   piece.data)
    for cache in new_caches.values():
        layers = (cache.layer_range.start, cache.layer_range.stop)
        h0, h1 = cache.head_range
        got = cache.read(new_table, layers, (h0, h1), (0, tokens))
        assert torch.equal(got, full[layers[0]:layers[1], :, :, h0:h1])
