"""The batched sampler: whole-batch filtering and drawing on the logits' device, keyed by
(seed, position) so a row draws the same alone or batched, and draws that follow p."""

from __future__ import annotations

import pytest
import torch

from spotserve.worker.engine.sampling import (
    filter_batch,
    filter_logits,
    sample,
    sample_one,
    uniforms,
)
from spotserve.worker.engine.sequence import SamplingParams

MIXED = [SamplingParams(),                                            # greedy
         SamplingParams(temperature=0.8, top_k=5, seed=1),
         SamplingParams(temperature=1.2, top_p=0.7, seed=2),
         SamplingParams(temperature=1.0, top_k=40, top_p=0.9, seed=3),
         SamplingParams(temperature=0.5, seed=4)]


def test_a_batch_samples_what_each_row_samples_alone() -> None:
    torch.manual_seed(0)
    logits = torch.randn(len(MIXED), 300)
    for position in range(20):
        batched = sample(logits, MIXED, [position] * len(MIXED))
        alone = [sample_one(row, p, position) for row, p in zip(logits, MIXED, strict=True)]
        assert batched == alone
    assert sample(logits[:1], MIXED[:1], [0]) == [int(torch.argmax(logits[0]))]


def test_the_batched_filter_is_each_rows_filter() -> None:
    torch.manual_seed(1)
    logits = torch.randn(len(MIXED), 200)
    together = filter_batch(logits, MIXED)
    for row, p, got in zip(logits, MIXED, together, strict=True):
        assert torch.equal(filter_logits(row, p), got)
    kept = torch.isfinite(together).sum(-1).tolist()
    assert kept[0] == 200 and kept[1] == 5 and 1 <= kept[2] < 200 and kept[3] <= 40


def test_draws_follow_the_distribution() -> None:
    """Exact sampling: over many positions the frequencies match softmax(logits / T)."""
    want = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = want.log()
    params = SamplingParams(temperature=1.0, seed=9)
    draws = torch.tensor([sample_one(logits, params, pos) for pos in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, want, atol=0.03), freq


def test_uniforms_are_keyed_by_row_and_open_on_both_ends() -> None:
    u = uniforms([7, 7, 8], torch.arange(5000).expand(3, 5000))
    assert torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.02
    # a token's number depends on its index, not on where it sits among the candidates
    some = torch.tensor([[4999, 3, 17]])
    assert torch.equal(uniforms([8], some)[0], u[2, [4999, 3, 17]])


@pytest.mark.gpu
def test_cpu_and_gpu_draw_the_same_numbers() -> None:
    keys = [1, 2**40 + 3, 2**62 + 5]
    index = torch.arange(1000).expand(3, 1000)
    assert torch.equal(uniforms(keys, index), uniforms(keys, index.cuda()).cpu())
