"""Golden test: our decoder's logits equal `transformers`' reference implementation (fp32),
for a tiny random model of each supported family, loaded from sharded safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spotserve.layout import ParallelConfig, Position
from spotserve.worker.engine.kv_cache import KVCache
from spotserve.worker.model.attention import AttentionBatch, SequenceChunk
from spotserve.worker.model.decoder import StageModel
from spotserve.worker.model.loader import load_into, load_stage
from tests.engine.tiny_models import FAMILIES, build_hf_model

BLOCK = 4


def _forward(model: StageModel, cache: KVCache, chunks: list[tuple[list[int], int, list[int]]]
             ) -> torch.Tensor:
    """Run one step: each chunk is (new token ids, context length after, block table)."""
    batch = AttentionBatch.build([SequenceChunk(len(t), ctx, table) for t, ctx, table in chunks],
                                 BLOCK, sliding_window=model.sliding_window)
    ids = torch.tensor([t for tokens, _, _ in chunks for t in tokens])
    with torch.no_grad():
        return model.compute_logits(model(ids, batch, cache.layers))


def _load(folder: Path) -> tuple[StageModel, KVCache]:
    model = load_stage(folder, ParallelConfig.uniform(4, 1, 1, 1), Position(0, 0, 0))
    return model, KVCache.for_stage(model, num_blocks=32, block_size=BLOCK)


CASES = {**{f: (f, {}) for f in FAMILIES}, "mistral-window4": ("mistral", {"sliding_window": 4})}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path: Path, case: str) -> None:
    family, overrides = CASES[case]
    hf = build_hf_model(family, seed=3, **overrides)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, cache = _load(tmp_path)
    prompts = [[5, 17, 99, 3, 42, 8, 61, 7, 120, 33, 2], [9, 4, 77, 100, 1]]
    with torch.no_grad():
        expected = [hf(torch.tensor([p])).logits[0] for p in prompts]
    tables = [list(range(0, 3)), list(range(3, 5))]
    got = _forward(model, cache, [(p, len(p), t) for p, t in zip(prompts, tables, strict=True)])
    torch.testing.assert_close(got[:11], expected[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[11:], expected[1], rtol=1e-4, atol=1e-4)


def test_chunked_prefill_and_decode_match_full_prefill(tmp_path: Path) -> None:
    build_hf_model("llama", seed=5).save_pretrained(tmp_path, max_shard_size="40KB")
    model, cache = _load(tmp_path)
    tokens = [11, 22, 33, 44, 55, 66, 77, 88, 99]
    full = _forward(model, cache, [(tokens, 9, [0, 1, 2])])
    table = [7, 3, 12]  # scattered blocks
    first = _forward(model, cache, [(tokens[:5], 5, table)])
    second = _forward(model, cache, [(tokens[5:8], 8, table), ([1, 2], 2, [20])])
    last = _forward(model, cache, [(tokens[8:], 9, table)])
    torch.testing.assert_close(torch.cat([first, second[:3], last]), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_read_write_by_layer_head_token(tmp_path: Path) -> None:
    cache = KVCache(range(2, 4), (1, 3), 8, num_blocks=6, block_size=BLOCK, dtype=torch.float32)
    data = torch.randn(2, 2, 7, 2, 8)
    cache.write([4, 1], (2, 4), (1, 3), (0, 7), data)
    torch.testing.assert_close(cache.read([4, 1], (2, 4), (1, 3), (0, 7)), data)
    torch.testing.assert_close(cache.read([4, 1], (3, 4), (2, 3), (2, 6)), data[1:, :, 2:6, 1:])
    with pytest.raises(ValueError, match="not held here"):
        cache.read([4, 1], (0, 4), (1, 3), (0, 7))


def test_runner_from_pulled_tensors_equals_checkpoint(tmp_path: Path) -> None:
    """After a migration, weights arrive as slices from peers instead of the checkpoint."""
    from spotserve.worker.engine.builder import build_runner
    from spotserve.worker.engine.engine import EngineConfig
    from spotserve.worker.model.loader import read_slices
    from spotserve.worker.model.parallel import EpochGroups
    build_hf_model("qwen2", seed=1).save_pretrained(tmp_path, max_shard_size="40KB")
    config = EngineConfig(num_blocks=8, block_size=BLOCK)
    groups = EpochGroups.single(ParallelConfig.uniform(4, 1, 1, 1))
    from_disk = build_runner(tmp_path, groups, config)
    pulled = read_slices(tmp_path, from_disk.model.slices, torch.float32)
    from_peers = build_runner(tmp_path, groups, config, tensors=pulled)
    step = [([3, 1, 4, 1, 5, 9, 2, 6], 8, [0, 1])]
    torch.testing.assert_close(_forward(from_peers.model, from_peers.cache, step),
                               _forward(from_disk.model, from_disk.cache, step))
    # what no peer sent is read from the checkpoint
    partial = {k: v for k, v in pulled.items() if "layers.2." not in k}
    fallback = build_runner(tmp_path, groups, config, tensors=partial)
    torch.testing.assert_close(_forward(fallback.model, fallback.cache, step),
                               _forward(from_disk.model, from_disk.cache, step))
    with pytest.raises(ValueError, match="missing"):
        load_into(StageModel(from_disk.model.spec, groups.config, Position(0, 0, 0)), partial)


@pytest.mark.parametrize("tensors", ["checkpoint", "pulled"])
def test_a_new_stage_takes_over_the_layers_it_keeps(tmp_path: Path, tensors: str) -> None:
    """P=2 -> P=1: the GPU of the old last stage keeps layers 2-3, the final norm and the
    LM head where they are (same storage, nothing read or copied), loads layers 0-1 and
    the embedding, and computes what a fresh load computes."""
    from spotserve.worker.model.loader import read_slices
    build_hf_model("llama", seed=2).save_pretrained(tmp_path, max_shard_size="40KB")
    old = load_stage(tmp_path, ParallelConfig.uniform(4, 1, 2, 1), Position(0, 1, 0))
    held = {name: p.data_ptr() for name, p in old.named_parameters()}
    one = ParallelConfig.uniform(4, 1, 1, 1)
    if tensors == "checkpoint":
        new = load_stage(tmp_path, one, Position(0, 0, 0), reuse=old)
    else:   # as after a gather: every slice but the kept ones arrived from peers
        fresh = StageModel(old.spec, one, Position(0, 0, 0))
        pulled = read_slices(tmp_path, fresh.slices, torch.float32)
        new = StageModel(old.spec, one, Position(0, 0, 0), reuse=old)
        load_into(new, {k: v for k, v in pulled.items() if k not in new.reused})
    taken = {n for n, p in new.named_parameters() if held.get(n) == p.data_ptr()}
    assert taken == set(held) == new.reused
    # the old stage let go of all it did not hand over (freed before the new one allocated)
    assert {id(p) for p in old.parameters()} <= {id(p) for p in new.parameters()}
    reference = load_stage(tmp_path, one, Position(0, 0, 0))
    step = [([3, 1, 4, 1, 5, 9, 2, 6], 8, [0, 1]), ([7], 1, [2])]
    cache = KVCache.for_stage(reference, num_blocks=8, block_size=BLOCK)
    expected = _forward(reference, cache, step)
    cache = KVCache.for_stage(new, num_blocks=8, block_size=BLOCK)
    torch.testing.assert_close(_forward(new, cache, step), expected)


def test_a_layer_with_a_new_slice_is_not_taken_over(tmp_path: Path) -> None:
    """TP 1 -> TP 2: every projection's slice changes, and a layer goes whole or not at
    all (its projections share one buffer); the vocabulary-split embedding and head change
    too. Only the replicated final norm stays."""
    build_hf_model("llama", seed=2).save_pretrained(tmp_path, max_shard_size="40KB")
    old = load_stage(tmp_path, ParallelConfig.uniform(4, 1, 1, 1), Position(0, 0, 0))
    new = StageModel(old.spec, ParallelConfig.uniform(4, 1, 1, 2), Position(0, 0, 1),
                     reuse=old)
    assert new.reused == {"model.norm.weight"}



def test_cpu_lm_head_in_chunks_equals_one_matmul() -> None:
    from spotserve.worker.model.decoder import CPU_VOCAB_CHUNK, vocab_logits
    torch.manual_seed(0)
    weight = torch.randn(2 * CPU_VOCAB_CHUNK + 77, 48)   # a ragged last chunk
    hidden = torch.randn(5, 48)
    got = vocab_logits(hidden, weight)
    assert got.shape == (5, weight.shape[0])
    torch.testing.assert_close(got, hidden @ weight.T, rtol=1e-6, atol=1e-6)
