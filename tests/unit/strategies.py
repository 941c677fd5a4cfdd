"""Hypothesis strategies for small models and (possibly heterogeneous) configurations."""

from __future__ import annotations

import itertools

from hypothesis import strategies as st

from spotserve.layout import ParallelConfig, PipelineLayout, StageLayout
from spotserve.model_spec import ModelSpec


@st.composite
def tiny_models(draw: st.DrawFn) -> ModelSpec:
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.sampled_from([1, 2, 4]))
    family = draw(st.sampled_from(["llama", "qwen2", "qwen3"]))
    return ModelSpec(
        name="tiny", family=family, hidden_size=heads * 4, head_dim=4,
        intermediate_size=draw(st.integers(5, 40)), num_layers=draw(st.integers(1, 6)),
        num_heads=heads, num_kv_heads=kv, vocab_size=draw(st.integers(7, 50)),
        max_position=64, dtype="float32", tie_word_embeddings=draw(st.booleans()),
        qkv_bias=family == "qwen2", qk_norm=family == "qwen3")


@st.composite
def configs(draw: st.DrawFn, model: ModelSpec, max_pipelines: int = 3) -> ParallelConfig:
    """D pipelines, each with its own uneven layer split and per-stage TP degrees."""
    tps = [tp for tp in (1, 2, 3, 4, 8) if model.supports_tp(tp)]
    pipelines = []
    for _ in range(draw(st.integers(1, max_pipelines))):
        stages = draw(st.integers(1, model.num_layers))
        cuts = sorted(draw(st.sets(st.integers(1, model.num_layers - 1),
                                   min_size=stages - 1, max_size=stages - 1))
                      if stages > 1 else set())
        bounds = [0, *cuts, model.num_layers]
        pipelines.append(PipelineLayout(tuple(
            StageLayout(a, b, draw(st.sampled_from(tps)))
            for a, b in itertools.pairwise(bounds))))
    return ParallelConfig(tuple(pipelines), batch=draw(st.integers(1, 4)))
