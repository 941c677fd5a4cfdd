"""Memory check: shard + KV cache against GPU memory, with the layout math's byte counts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from spotserve.layout import (
    ParallelConfig,
    PipelineLayout,
    Position,
    StageLayout,
    position_kv_bytes_per_token,
    position_weight_bytes,
)
from spotserve.models import resolve_model
from spotserve.operator.planner.memory import config_fits, stage_bytes

from .support import CATALOG, tiny_model


@settings(max_examples=60, deadline=None)
@given(layers=st.integers(1, 7), tp=st.sampled_from([1, 2, 4]), data=st.data())
def test_stage_bytes_equal_the_layout_math(layers: int, tp: int, data: st.DataObject) -> None:
    model = tiny_model(layers)
    start = data.draw(st.integers(0, layers - 1))
    end = data.draw(st.integers(start + 1, layers))
    batch, tokens = data.draw(st.integers(0, 4)), data.draw(st.integers(0, 100))
    stages = [StageLayout(start, end, tp)]
    if start:
        stages.insert(0, StageLayout(0, start, 1))
    if end < layers:
        stages.append(StageLayout(end, layers, 1))
    config = ParallelConfig((PipelineLayout(tuple(stages)),), batch or 1)
    index = 1 if start else 0
    expected = max(position_weight_bytes(model, config, Position(0, index, r))
                   + position_kv_bytes_per_token(model, config, Position(0, index, r))
                   * batch * tokens for r in range(tp))
    assert stage_bytes(model, tp, start, end, batch, tokens) == expected


def test_paper_model_fits_two_t4s_at_least() -> None:
    model = resolve_model("opt-6.7b")  # fp32: 26.8 GB of weights; SpotServe asks for 4 GPUs
    t4 = CATALOG.gpu("T4")
    tokens = 512 + 128
    assert not config_fits(model, t4, ParallelConfig.uniform(32, 1, 1, 1, 4), tokens)
    assert config_fits(model, t4, ParallelConfig.uniform(32, 1, 1, 2, 4), tokens)
    assert config_fits(model, t4, ParallelConfig.uniform(32, 2, 2, 1, 4), tokens)
    assert config_fits(model, t4, ParallelConfig.uniform(32, 1, 1, 4, 4), tokens)
    # the KV cache counts: a huge batch no longer fits where a small one does
    assert not config_fits(model, t4, ParallelConfig.uniform(32, 1, 1, 4, 64), tokens)
